"""musegen: a Compound Word Transformer pipeline for piano MIDI."""

from typing import Any

__version__ = "0.1.0"


def load_champion(uri: str | None = None) -> Any:
    """The registered champion (an MLflow pyfunc) from the repository's store: see
    `musegen.stages.register.load_champion` (imported on call: `import musegen` stays light)."""
    from musegen.stages.register import load_champion as load

    return load(uri)
