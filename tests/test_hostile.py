"""Hostile inputs, crafted here: odd file names, FIFOs, device links, unreadable folders.

Each test is one defect found by trying the product as an attacker would (issue 10); the
guards are general (one safe read in musegen.files, one archive guard in musegen.stages.corpus, one
params check in the CLI), so these cases stand for the families they belong to.
"""

from __future__ import annotations

import http.server
import io
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import tarfile
import threading
import time
import zlib
from pathlib import Path

import pytest
import yaml

from musegen import files
from musegen.config import load_section
from musegen.stages import prepare
from tests import badmidi

ROOT = Path(__file__).resolve().parents[1]
LATIN1 = os.fsdecode(b"caf\xe9.mid")  # "café.mid" in Latin-1: not valid UTF-8


def musegen(*args: str, cwd: Path, prefix: tuple[str, ...] = (), timeout: float = 120):
    """Run the CLI as a user would (a subprocess, this repository's params unless given)."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    cmd = [*prefix, sys.executable, "-m", "musegen", *args]
    return subprocess.run(
        cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def without_privileges() -> tuple[str, ...]:
    """A command prefix under which a chmod 000 folder is unreadable (root reads everything).

    As root: a user namespace mapping nobody to us, so we keep ownership but lose root's
    capabilities (permission bits apply again). Skips where user namespaces are unavailable.
    """
    if os.geteuid() != 0:
        return ()
    prefix = ("unshare", "--user", "--map-user=65534", "--map-group=65534")
    if (
        not shutil.which("unshare")
        or subprocess.run([*prefix, "true"], check=False).returncode != 0
    ):
        pytest.skip("running as root without user namespaces: no folder is unreadable to root")
    return prefix


# ---- one safe read --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [LATIN1, "plain.mid", "back\\slash.mid", "new\nline.mid", "x41\\x41.mid", "日本.mid", "\\"],
)
def test_printable_names_are_utf8_and_reversible(name):
    text = files.printable(name)
    text.encode("utf-8")  # never raises: the manifest is UTF-8
    assert text.isprintable()
    assert files.from_printable(text) == name


@pytest.mark.timeout(30)
def test_safe_read_refuses_fifo_device_folder_and_growth(tmp_path):
    os.mkfifo(tmp_path / "pipe.mid")  # opening it for reading would block forever
    (tmp_path / "zero.mid").symlink_to("/dev/zero")  # size 0, never ends
    (tmp_path / "gone.mid").symlink_to(tmp_path / "nothing")
    (tmp_path / "big.mid").write_bytes(b"MThd" + bytes(100))
    (tmp_path / "ok.mid").write_bytes(b"MThd" + bytes(10))
    cases = {
        "pipe.mid": ("not_regular", "FIFO"),
        "zero.mid": ("not_regular", "character device"),
        ".": ("not_regular", "folder"),
        "gone.mid": ("missing", "a link to nothing"),
        "none.mid": ("missing", "no such file"),
        "big.mid": ("too_large", "exceeds"),
    }
    for name, (reason, words) in cases.items():
        with pytest.raises(files.FileRefusedError) as exc:
            files.read_regular(tmp_path / name, 50)
        assert (exc.value.reason, words in str(exc.value)) == (reason, True), name
    assert files.read_regular(tmp_path / "ok.mid", 50) == b"MThd" + bytes(10)


# ---- prepare ----------------------------------------------------------------------------------


@pytest.mark.timeout(300)
def test_prepare_reports_every_hostile_entry_in_seconds(tmp_path):
    """Non-UTF-8 name, FIFO, link to a device, unreadable folder and file: one row each."""
    prefix = without_privileges()
    raw = tmp_path / "raw"
    badmidi.valid_piece(raw, "a.mid", seed=1)
    badmidi.valid_piece(raw, "b.mid", seed=2).rename(raw / LATIN1)
    os.mkfifo(raw / "x.mid")
    (raw / "zero.mid").symlink_to("/dev/zero")
    badmidi.valid_piece(raw / "locked", "inside.mid", seed=3)
    (raw / "locked").chmod(0)
    badmidi.valid_piece(raw, "secret.mid", seed=4).chmod(0)
    try:
        t0 = time.monotonic()
        proc = musegen(
            "prepare", "--raw", "raw", "--out", "out", "--params", str(ROOT / "params.yaml"),
            cwd=tmp_path, prefix=prefix,
        )  # fmt: skip
        seconds = time.monotonic() - t0
    finally:
        (raw / "locked").chmod(0o755)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert seconds < 60, f"took {seconds:.0f} s"
    m = prepare.read_manifest(tmp_path / "out" / "manifest.csv")
    got = {r.path: (r.status, r.reason) for r in m.itertuples()}
    assert got == {
        "a.mid": ("ok", ""),
        "caf\\xe9.mid": ("ok", ""),  # the byte 0xE9 written as text; nothing lost
        "locked/": ("rejected", "unreadable"),
        "secret.mid": ("rejected", "unreadable"),
        "x.mid": ("rejected", "not_regular"),
        "zero.mid": ("rejected", "not_regular"),
    }, proc.stdout
    assert "locked/: unreadable: cannot list the folder (Permission denied)" in proc.stdout
    (tmp_path / "out" / "manifest.csv").read_bytes().decode("utf-8")  # valid UTF-8


def test_tokenize_reads_a_non_utf8_name_from_the_manifest(tmp_path):
    from musegen.stages import tokenize

    raw = tmp_path / "raw"
    for seed in range(3):
        badmidi.valid_piece(raw, f"{seed}.mid", seed=seed).rename(raw / f"{seed}{LATIN1}")
    params = load_section(prepare.PrepareParams, "prepare", ROOT / "params.yaml")
    params = prepare.dataclasses.replace(params, num_workers=1, valid_percent=0, test_percent=0)
    m = prepare.prepare(raw, tmp_path / "prep", params)
    assert (m.status == "ok").all(), m.detail.tolist()
    tp = load_section(tokenize.TokenizeParams, "tokenize", ROOT / "params.yaml")
    tp = prepare.dataclasses.replace(tp, num_workers=1, metrics=str(tmp_path / "metrics.json"))
    tokenize.tokenize(raw, tmp_path / "prep" / "manifest.csv", tmp_path / "tokens", tp)
    metrics = (tmp_path / "metrics.json").read_text()
    assert '"failed": 0' in metrics, metrics


# ---- corpus pop1k7 --from: one archive guard --------------------------------------------------


def zip_bytes(members: list[tuple[str, bytes, int, int, int]]) -> bytes:
    """A zip written by hand: (name, deflate data, crc, size, unix mode) per member.

    By hand because zipfile would have to compress the 3 GiB itself (~25 s); sizes up to 4 GiB
    need no zip64.
    """
    local, central = b"", b""
    for name, data, crc, size, mode in members:
        raw = name.encode()
        # flags, method 8 (deflate), time, date, crc, compressed and uncompressed sizes
        head = struct.pack("<HHHHIII", 0, 8, 0, 0x21, crc, len(data), size)
        central += struct.pack("<4sHH", b"PK\1\2", 0x314, 20) + head  # made by: unix (mode)
        central += struct.pack("<HHHHHII", len(raw), 0, 0, 0, 0, mode << 16, len(local)) + raw
        local += struct.pack("<4sH", b"PK\3\4", 20) + head + struct.pack("<HH", len(raw), 0)
        local += raw + data
    end = struct.pack(
        "<4sHHHHIIH", b"PK\5\6", 0, 0, *[len(members)] * 2, len(central), len(local), 0
    )
    return local + central + end


def deflated_zeros(mib: int, crc: int = 0) -> tuple[bytes, int]:
    """Raw deflate of `mib` MiB of zeros (~1 kB per MiB) and its CRC-32 (continuing `crc`)."""
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = c.compress(bytes(1 << 20)) + c.flush(zlib.Z_FULL_FLUSH)  # history reset: repeatable
    assert block == c.compress(bytes(1 << 20)) + c.flush(zlib.Z_FULL_FLUSH)
    zeros = bytes(1 << 20)
    for _ in range(mib):
        crc = zlib.crc32(zeros, crc)
    return block * mib + c.flush(zlib.Z_FINISH), crc


def tar_gz(members: list[tarfile.TarInfo], data: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as tf:
        for info in members:
            tf.addfile(info, io.BytesIO(data[info.name]) if info.name in data else None)
    return out.getvalue()


def corpus_repo(tmp_path: Path) -> Path:
    """A folder with params.yaml (raw_root inside it) to run `musegen corpus pop1k7` in."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"]["raw_root"] = "raw"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    return tmp_path


def run_measured(*args: str, cwd: Path) -> tuple[subprocess.CompletedProcess, float, float]:
    """Run the CLI; return (process, seconds, its own peak RSS in MB, printed at exit)."""
    # VmHWM: this process's own peak (ru_maxrss would carry pytest's peak across fork + exec)
    code = (
        "import re, runpy, sys\n"
        "sys.argv = ['musegen', *sys.argv[1:]]\n"
        "try: runpy.run_module('musegen', run_name='__main__')\n"
        "finally:\n"
        "    hwm = re.search(r'VmHWM:\\s*(\\d+)', open('/proc/self/status').read()).group(1)\n"
        "    print('maxrss', hwm, file=sys.stderr)"
    )
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-c", code, *args], cwd=cwd, capture_output=True, text=True,
        timeout=120, check=False,
    )  # fmt: skip
    seconds = time.monotonic() - t0
    rss = [int(line.split()[1]) for line in proc.stderr.splitlines() if line.startswith("maxrss")]
    return proc, seconds, rss[-1] / 1024


def error_line(proc: subprocess.CompletedProcess) -> str:
    """The one error line; fails on a traceback or on more than one line."""
    lines = [x for x in proc.stderr.splitlines() if x.strip() and "%|" not in x]
    lines = [x for x in lines if not x.startswith("maxrss")]
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    return lines[0]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", ["one.zip", "many.zip", "one.tar.gz"])
def test_corpus_refuses_a_3gib_bomb_fast_small_and_clean(tmp_path, kind):
    """3 MB that expands to 3 GiB: one member (its size declared), or 300 of 10 MiB (ratio)."""
    repo = corpus_repo(tmp_path)
    mib, name = 3 * 1024, "Pop1K7/midi_analyzed/a/bomb{}.mid"
    archive = repo / f"bomb.{kind}"
    if kind == "one.zip":
        data, crc = deflated_zeros(mib)
        archive.write_bytes(zip_bytes([(name.format(0), data, crc, mib << 20, 0o100644)]))
    elif kind == "many.zip":
        data, crc = deflated_zeros(10)
        members = [(name.format(i), data, crc, 10 << 20, 0o100644) for i in range(mib // 10)]
        archive.write_bytes(zip_bytes(members))
    else:  # gzip of one tar member: its header, then 3 GiB of zeros (crc and size are right)
        info = tarfile.TarInfo(name.format(0))
        info.size = mib << 20
        head = info.tobuf(format=tarfile.GNU_FORMAT)
        c = zlib.compressobj(9, zlib.DEFLATED, -15)
        first = c.compress(head) + c.flush(zlib.Z_FULL_FLUSH)
        # + 1 MiB: the tar end blocks are zeros too
        zeros, crc = deflated_zeros(mib + 1, zlib.crc32(head))
        isize = (len(head) + ((mib + 1) << 20)) & 0xFFFFFFFF
        gzip_head = b"\x1f\x8b\x08\x00" + bytes(4) + b"\x00\x03"
        archive.write_bytes(gzip_head + first + zeros + struct.pack("<II", crc, isize))
    size_mb = archive.stat().st_size / 1e6
    assert size_mb < 4, size_mb
    # the peer, in the same run: the same command refusing at once (a missing --from), so a
    # busy machine's slow start-up is not counted as extraction time
    peer, peer_s, _ = run_measured("corpus", "pop1k7", "--from", "nope", "--no-dvc", cwd=repo)
    assert "nope: no such archive or folder" in error_line(peer)
    proc, seconds, rss_mb = run_measured(
        "corpus", "pop1k7", "--from", archive.name, "--no-dvc", cwd=repo
    )
    line = error_line(proc)
    assert "midi_analyzed/a/bomb" in line and "corpus.max_" in line, line
    shown = f"{kind}: {size_mb:.1f} MB refused in {seconds:.1f} s (start-up {peer_s:.1f} s)"
    print(f"{shown}, peak {rss_mb:.0f} MB")
    assert seconds - peer_s < 5, f"{seconds:.1f} s, {peer_s:.1f} s of it start-up"
    assert rss_mb < 200, f"{rss_mb:.0f} MB peak"
    assert list((repo / "raw").iterdir()) == []  # no temp folder, nothing installed


REFUSED = {
    "../evil.mid": "leaves the folder",
    "/tmp/abs.mid": "leaves the folder",
    "link.mid": "a symlink",
    "dev.mid": "a character device",  # tar only below: zip has no devices, FIFOs or hard links
    "fifo.mid": "a FIFO",
    "hard.mid": "a hard link",
}


@pytest.mark.parametrize(
    ("kind", "entry", "words"),
    [
        (kind, entry, words)
        for kind in ("zip", "tar.gz")
        for entry, words in REFUSED.items()
        if kind == "tar.gz" or entry not in ("dev.mid", "fifo.mid", "hard.mid")
    ],
)
def test_corpus_refuses_traversal_links_and_devices_in_one_line(tmp_path, kind, entry, words):
    repo = corpus_repo(tmp_path)
    good = badmidi._piece(1)
    if kind == "zip":
        mode = 0o120777 if entry == "link.mid" else 0o100644
        payload = b"/etc/passwd" if entry == "link.mid" else good
        c = zlib.compressobj(9, zlib.DEFLATED, -15)
        members = [
            ("ok/a.mid", c.compress(good) + c.flush(), zlib.crc32(good), len(good), 0o100644)
        ]
        c = zlib.compressobj(9, zlib.DEFLATED, -15)
        data = c.compress(payload) + c.flush()
        members.append((entry, data, zlib.crc32(payload), len(payload), mode))
        archive = repo / "bad.zip"
        archive.write_bytes(zip_bytes(members))
    else:
        ok = tarfile.TarInfo("ok/a.mid")
        ok.size = len(good)
        bad = tarfile.TarInfo(entry)
        kinds = {"link.mid": tarfile.SYMTYPE, "dev.mid": tarfile.CHRTYPE}
        kinds |= {"fifo.mid": tarfile.FIFOTYPE, "hard.mid": tarfile.LNKTYPE}
        bad.type = kinds.get(entry, tarfile.REGTYPE)
        bad.linkname = "/etc/passwd" if entry in ("link.mid", "hard.mid") else ""
        data = {"ok/a.mid": good}
        if bad.type == tarfile.REGTYPE:
            bad.size, data[entry] = len(good), good
        archive = repo / "bad.tar.gz"
        archive.write_bytes(tar_gz([ok, bad], data))
    proc, _, _ = run_measured("corpus", "pop1k7", "--from", archive.name, "--no-dvc", cwd=repo)
    line = error_line(proc)
    assert repr(entry) in line and words in line, line
    assert list((repo / "raw").iterdir()) == []
    assert not (tmp_path.parent / "evil.mid").exists() and not Path("/tmp/abs.mid").exists()


def test_corpus_folder_source_refuses_a_fifo_and_a_device_link(tmp_path):
    repo = corpus_repo(tmp_path)
    src = repo / "mine"
    badmidi.valid_piece(src, "a.mid")
    os.mkfifo(src / "pipe.mid")
    proc, _, _ = run_measured("corpus", "pop1k7", "--from", "mine", "--no-dvc", cwd=repo)
    assert "pipe.mid: a FIFO (named pipe), not a regular file" in error_line(proc)
    (src / "pipe.mid").unlink()
    (src / "zero.mid").symlink_to("/dev/zero")
    proc, _, _ = run_measured("corpus", "pop1k7", "--from", "mine", "--no-dvc", cwd=repo)
    assert "zero.mid: a character device" in error_line(proc)
    assert list((repo / "raw").iterdir()) == []


@pytest.mark.timeout(120)
def test_corpus_cleans_its_temp_folder_on_sigterm_and_after_sigkill(tmp_path):
    """A download that stalls mid-archive: SIGTERM cleans up; a SIGKILL's leftover goes next run."""
    release = threading.Event()

    class Stalling(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path.endswith("/7"):
                body = json.dumps(
                    {"files": [{"key": "Pop1K7.zip", "size": 10**6, "checksum": "md5:0",
                                "links": {"self": f"{base}/content"}}]}
                ).encode()  # fmt: skip
            else:
                body = b"PK\3\4" + bytes(1000)  # then nothing, until the test ends
            self.send_response(200)
            self.send_header("Content-Length", str(10**6 if self.path == "/content" else len(body)))
            self.end_headers()
            self.wfile.write(body)
            self.wfile.flush()
            if self.path == "/content":
                release.wait(60)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Stalling)
    base = f"http://127.0.0.1:{server.server_address[1]}"
    threading.Thread(target=server.serve_forever, daemon=True).start()
    repo = corpus_repo(tmp_path)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["corpus"] |= {"zenodo_api": base, "pop1k7_record": 7}
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    cmd = [sys.executable, "-m", "musegen", "corpus", "pop1k7", "--no-dvc"]
    try:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            proc = subprocess.Popen(cmd, cwd=repo, stderr=subprocess.PIPE, text=True)
            deadline = time.monotonic() + 60
            while not list((repo / "raw").glob(".pop1k7-*/download/*")):
                assert time.monotonic() < deadline and proc.poll() is None, proc.stderr.read()
                time.sleep(0.05)
            proc.send_signal(sig)
            proc.wait(30)
            left = list((repo / "raw").glob(".pop1k7-*"))
            assert (sig, left) == (sig, [] if sig == signal.SIGTERM else left), left
            assert "Traceback" not in proc.stderr.read()
        assert len(left) == 1  # SIGKILL cannot be caught: the next run removes it
        badmidi.valid_piece(repo / "mine", "a.mid")
        proc = musegen("corpus", "pop1k7", "--from", "mine", "--no-dvc", cwd=repo)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert sorted(p.name for p in (repo / "raw").iterdir()) == ["pop1k7"]
    finally:
        release.set()
        server.shutdown()


# ---- CLI arguments: one check per params dataclass, blaming the flag or the file ------------


def cli(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str]:
    """Run `musegen ARGV` in this process through the real entry point; (exit code, stderr)."""
    from musegen.apps.cli import main

    old = sys.argv
    sys.argv = ["musegen", *argv]
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    finally:
        sys.argv = old
    return code, capsys.readouterr().err


def one_error(code: int, err: str) -> str:
    lines = [x for x in err.splitlines() if x.strip()]
    assert code != 0 and len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.mark.parametrize(
    ("flags", "words"),
    [
        (["--bars", "-5"], "--bars -5: expected a whole number >= 0 (0 = no cap)"),
        (["--n", "0"], "--n 0: expected a whole number >= 1"),
        (["--words", "-1"], "--words -1: expected a whole number >= 0"),
        (["--minutes", "-1"], "--minutes -1.0: expected a number >= 0"),
        (["--minutes", "inf"], "--minutes inf: expected a number >= 0"),
        (["--prompt-bars", "0"], "--prompt-bars 0: expected a whole number >= 1"),
        (["--prompt", "/etc"], "--prompt /etc: not_regular: a folder, not a regular file"),
        (["--prompt", "nope.mid"], "--prompt nope.mid: missing: no such file"),
        (["--prompt", "pipe.mid"], "--prompt pipe.mid: not_regular: a FIFO"),
        (["--prompt", "zero.mid"], "--prompt zero.mid: not_regular: a character device"),
        (
            ["--temperature", "pitch=-1"],
            "--temperature pitch=-1: expected a finite number >= 0 (0 = greedy) "
            "(sample.temperature.pitch)",
        ),
        (["--top-p", "pitch=1.5"], "--top-p pitch=1.5: expected a number in (0, 1]"),
    ],
)
@pytest.mark.timeout(60)
def test_generate_refuses_bad_flags_in_one_line_naming_the_flag(
    tmp_path, capsys, monkeypatch, flags, words
):
    monkeypatch.chdir(tmp_path)
    os.mkfifo(tmp_path / "pipe.mid")
    (tmp_path / "zero.mid").symlink_to("/dev/zero")
    params = str(ROOT / "params.yaml")
    line = one_error(*cli(capsys, "generate", *flags, "--params", params))
    assert line == f"error: {words}" or line.startswith(f"error: {words}"), line
    assert "params.yaml" not in line  # the flag is to blame, not the file


@pytest.mark.parametrize(
    ("change", "words"),
    [
        (("generate", "max_bars", -5), "generate.max_bars = -5: expected a whole number >= 0"),
        (("generate", "num_samples", "4"), "generate.num_samples = '4': expected a whole number"),
        (("sample", "temperature", {"pitch": -1}), "sample.temperature.pitch = -1: expected"),
    ],
)
def test_bad_params_values_blame_the_file(tmp_path, capsys, monkeypatch, change, words):
    monkeypatch.chdir(tmp_path)  # no tuned overlay (reports/tune/) from the repository
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    section, key, value = change
    params[section][key] = params[section][key] | value if isinstance(value, dict) else value
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    line = one_error(*cli(capsys, "generate", "--params", str(path)))
    assert line.startswith(f"error: {path}: {words}"), line


# ---- concurrent writers ------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_tune_workers_finishing_together_never_collide(tmp_path):
    """Two `musegen tune` workers write best_sampling.yaml at once (48 of 600 failed before)."""
    import dataclasses
    from concurrent.futures import ThreadPoolExecutor

    import optuna

    from musegen.stages import tune

    tp = load_section(tune.TuneParams, "tune", ROOT / "params.yaml")
    tp = dataclasses.replace(tp, out_dir=str(tmp_path / "tune"))
    study = optuna.create_study(direction="maximize")
    dist = optuna.distributions.FloatDistribution(0.5, 2.0)
    study.add_trial(
        optuna.trial.create_trial(
            params={"temperature.pitch": 1.1}, distributions={"temperature.pitch": dist}, value=0.5
        )
    )
    best = study.best_trial

    def write(_: int) -> None:
        kw = {"objective_kind": "proxy", "n_ratings": 0, "rho": None, "seconds": [1.0]}
        tune.write_results(tp, best, study=study, **kw)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(write, range(300)))  # raises the first error any writer hit
    out = tmp_path / "tune"
    names = sorted(p.name for p in out.iterdir())
    assert names == ["best_sampling.yaml", "headline.json", "metrics.json"]
    best_sampling = yaml.safe_load((out / "best_sampling.yaml").read_text())
    assert best_sampling == {"temperature": {"pitch": 1.1}, "top_p": {}}
