"""Ray Serve deployment of the service (`pip install .[ray]`): see app/serve/deployment.py.

`serve run app.serve:app` builds the application from the settings when it asks for `app`; importing
this package needs no Ray (app/serve/routing.py is pure Python).
"""

from __future__ import annotations


def main() -> None:
    from app.serve.deployment import main as run

    run()


def __getattr__(name: str):
    if name == "app":
        from app.serve.deployment import build_app

        globals()["app"] = built = build_app()
        return built
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
