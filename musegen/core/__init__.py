"""The library the stages share: MIDI, tokenizers, model, sampling, generation, metrics, audio.

Nothing here knows about DVC, Prefect or the CLI."""
