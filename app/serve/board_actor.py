"""The board (app/serve/board.py) as a Ray actor: one per application, named, found by the ingress
and by every replica with `get_board(app_name)`."""

from __future__ import annotations

import ray

from app.serve.board import Board

BOARD_NAMESPACE = "brand-image-service"


def board_name(app_name: str) -> str:
    return f"brand-image-board-{app_name}"


@ray.remote(num_cpus=0)
class BoardActor(Board):
    pass


def get_board(app_name: str):
    """The board actor of `app_name`, created on first use (detached: it outlives a restarted ingress)."""
    return BoardActor.options(
        name=board_name(app_name), namespace=BOARD_NAMESPACE, get_if_exists=True, lifetime="detached",
        num_cpus=0, max_concurrency=1000,
    ).remote()  # fmt: skip
