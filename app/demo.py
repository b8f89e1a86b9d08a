"""Demo brands for the embedded model, so a newcomer can try LoRAs at once.

`python -m app.demo [LORA_DIR]` writes three brands (both key formats, with metadata.json) made for
the embedded model; their effect on the (noise) images is clearly visible. Existing files are kept.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from app.config import Settings, load_settings
from app.lora.synthetic import random_lora_state_dict, target_layers, write_lora

DEMO_BRANDS = {
    # brand: (key format, rank, seed, versions, metadata)
    "acme": ("peft", 8, 11, 1, {"type": "style", "base_model": "embedded tiny SD 1.5 (random weights)",
                                "training_steps": 0, "version_notes": "demo LoRA with random factors"}),
    "globex": ("kohya", 8, 22, 2, {"type": "product", "base_model": "embedded tiny SD 1.5 (random weights)",
                                    "training_steps": 0, "version_notes": "demo kohya-format LoRA"}),
    "studio-light": ("peft", 4, 33, 1, {"type": "photography", "base_model": "embedded tiny SD 1.5",
                                        "version_notes": "demo photography LoRA"}),
}


def write_demo_loras(lora_dir: Path, settings: Settings | None = None) -> list[Path]:
    """Write the demo brands into `lora_dir` for the embedded model; returns the files written."""
    from app.engine.embedded import build_embedded_pipeline

    pipe = build_embedded_pipeline()
    written = []
    for brand, (key_format, rank, seed, versions, metadata) in DEMO_BRANDS.items():
        for v in range(1, versions + 1):
            folder = Path(lora_dir) / brand / (f"v{v}" if versions > 1 else "")
            path = folder / "style.safetensors"
            if path.exists():
                continue
            layers = target_layers(pipe.unet, pipe.text_encoder, feed_forward=True)
            state = random_lora_state_dict(layers, rank=rank, key_format=key_format, seed=seed + v, strength=2.0)
            write_lora(path, state)
            (folder / "metadata.json").write_text(json.dumps({**metadata, "version": f"v{v}"}, indent=2) + "\n")
            written.append(path)
    return written


def main(argv: list[str]) -> int:
    lora_dir = Path(argv[0]) if argv else load_settings().lora_base_dir
    written = write_demo_loras(lora_dir)
    for path in written:
        print(f"wrote {path}")
    print(f"demo brands in {lora_dir}: {', '.join(DEMO_BRANDS)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
