"""`python -m app.train --brand BRAND --data DIR [options]`: train a LoRA and publish it as the brand's next version.

Reads MODEL_ID, DEVICE, DTYPE, LORA_BASE_DIR (and the rest) from the service's settings (environment and
`.env`). Exit status: 0 published, 1 refused or failed (the reason on stderr), 2 bad options,
130 interrupted (Ctrl-C or SIGTERM; with checkpoints, `--resume` continues).

`--progress-json` prints one JSON object per line on stdout instead of the progress bar (the HTTP
training jobs read it): {"event": "start", "steps"}, {"event": "step", "step", "steps", "loss"},
{"event": "done", "version", "file", "loss_first", "loss_last", "seconds"}, {"event": "error", "error"}.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import time

from pydantic import ValidationError

from app.config import load_settings
from app.train.options import TrainOptions, describe_errors

FLAGS = {  # option -> (flag, help)
    "steps": ("--steps", "optimizer steps (default 1000)"),
    "rank": ("--rank", "LoRA rank (default 4)"),
    "alpha": ("--alpha", "LoRA alpha (default: the rank)"),
    "learning_rate": ("--learning-rate", "AdamW learning rate (default 1e-4)"),
    "resolution": ("--resolution", "square training size, a multiple of 8 (default 512)"),
    "batch_size": ("--batch-size", "images per step (default 1)"),
    "seed": ("--seed", "seed of the LoRA init, batches and noise (default 0)"),
}
TYPES = {"steps": int, "rank": int, "alpha": float, "learning_rate": float, "resolution": int, "batch_size": int,
         "seed": int}  # fmt: skip


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m app.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--brand", required=True, help="the brand id (folder under LORA_BASE_DIR)")
    p.add_argument("--data", required=True, help="images with same-name .txt captions, or a metadata.jsonl")
    for name, (flag, text) in FLAGS.items():
        p.add_argument(flag, dest=name, type=TYPES[name], default=None, help=text)
    p.add_argument("--text-encoder", action="store_true", default=None, help="also train text-encoder LoRA layers")
    p.add_argument("--resume", action="store_true",
                   help="continue the brand's interrupted run from its checkpoint (same data and options; "
                        "--steps may be raised)")  # fmt: skip
    p.add_argument("--checkpoint-every", type=int, default=100,
                   help="keep a resumable checkpoint every N steps and on interruption (0 = none; default 100)")
    p.add_argument("--samples", type=int, default=2, help="sample images saved with the version (default 2)")
    p.add_argument("--sample-steps", type=int, default=20, help="denoising steps of each sample (default 20)")
    p.add_argument("--progress-json", action="store_true", help="JSON progress lines on stdout, no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    given = {name: getattr(args, name) for name in (*FLAGS, "text_encoder") if getattr(args, name) is not None}
    try:
        options = TrainOptions(**given)
    except ValidationError as exc:
        flags = {**{k: v[0] for k, v in FLAGS.items()}, "text_encoder": "--text-encoder"}
        lines = [f"  {flags.get(field, field)}: {message}" for field, message in describe_errors(exc)]
        print("Invalid options:\n" + "\n".join(lines), file=sys.stderr)
        return 2
    for name in ("checkpoint_every", "samples", "sample_steps"):
        if getattr(args, name) < 0 or (name == "sample_steps" and args.sample_steps < 1):
            print(f"Invalid options:\n  --{name.replace('_', '-')} must be at least "
                  f"{1 if name == 'sample_steps' else 0}", file=sys.stderr)  # fmt: skip
            return 2
    settings = load_settings()  # "Invalid configuration: ..." and exit 1 on a bad setting
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    json_mode = args.progress_json
    if json_mode:
        from diffusers.utils import logging as diffusers_logging
        from transformers.utils import logging as transformers_logging

        diffusers_logging.disable_progress_bar()
        transformers_logging.disable_progress_bar()

    def emit(event: str, **fields) -> None:
        if json_mode:
            print(json.dumps({"event": event, **fields}), flush=True)

    last = [0.0]

    def progress(step: int, steps: int, loss: float) -> None:
        now = time.monotonic()
        if step == steps or step == 1 or now - last[0] >= 0.25:
            last[0] = now
            emit("step", step=step, steps=steps, loss=loss)

    def on_sigterm(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_sigterm)
    from app.train.dataset import InvalidDataset
    from app.train.trainer import TrainingError, train_lora

    emit("start", steps=options.steps)
    try:
        result = train_lora(
            settings, args.brand, args.data, options, resume=args.resume, samples=args.samples,
            sample_steps=args.sample_steps, checkpoint_every=args.checkpoint_every, progress=progress,
            show_progress=not json_mode,
        )  # fmt: skip
    except KeyboardInterrupt:
        emit("cancelled")
        print("training interrupted; nothing was published" +
              (" (--resume continues from the checkpoint)" if args.checkpoint_every else ""), file=sys.stderr)
        return 130
    except (InvalidDataset, TrainingError, ValueError, OSError) as exc:
        # ValueError covers invalid brand ids and unsafe paths; UploadRefused is a refusal to publish.
        emit("error", error=str(exc))
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:
        from app.lora.uploads import UploadRefused

        if not isinstance(exc, UploadRefused):
            raise
        emit("error", error=str(exc))
        print(f"error: {exc}", file=sys.stderr)
        return 1
    emit("done", version=result.version, file=str(result.file), loss_first=result.loss_first,
         loss_last=result.loss_last, seconds=result.seconds)  # fmt: skip
    if not json_mode:
        print(f"{args.brand} {result.version}: {result.file}\n"
              f"loss {result.loss_first:.4f} -> {result.loss_last:.4f} in {result.steps} steps, {result.seconds:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
