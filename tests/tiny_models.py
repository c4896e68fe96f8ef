"""Two tiny random Llamas saved as Hugging Face folders, and two small prompt files, for the runs of
``workbench probe`` / ``workbench overlap`` across models (tests/test_probes_across.py, tests/test_executors.py)."""

from __future__ import annotations

from pathlib import Path

WORDS = ("river", "stone", "cloud", "lamp", "garden", "window", "kettle", "violin", "harbor", "meadow")


def save_tiny_pair(root: Path) -> dict[str, Path]:
    """``m0`` and ``m1`` (tiny Llamas of seeds 0 and 1, 2 layers, d_model 64) under ``root``, and prompt files
    ``pos.txt`` / ``neg.txt`` of 20 prompts each (split 12 / 4 / 4 by the probe command)."""
    from workbench.tiny import build_tiny

    out: dict[str, Path] = {"root": root}
    for name, seed in (("m0", 0), ("m1", 1)):
        model, tok = build_tiny("llama", seed=seed)
        model.save_pretrained(str(root / name))
        tok.save_pretrained(str(root / name))
        out[name] = root / name
    for name, lead in (("pos", "How do I break the"), ("neg", "Tell me a story about the")):
        lines = [f"{lead} {WORDS[i % len(WORDS)]} near the {WORDS[(3 * i + 1) % len(WORDS)]} {i}" for i in range(20)]
        (root / f"{name}.txt").write_text("\n".join(lines) + "\n")
        out[name] = root / f"{name}.txt"
    return out
