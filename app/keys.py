"""Make a key for API_KEYS_FILE, or check a keys file (docs/tenants.md).

    python -m app.keys new --name acme-web --brands 'acme*' --roles generate [--requests-per-minute 60]
    python -m app.keys check keys.toml

`new` prints the key once (it is stored nowhere) and the [[key]] block to paste into the file, which
holds only the key's sha256.
"""

from __future__ import annotations

import argparse
import json
import secrets
import sys

from app.access import BRAND_GLOB_PATTERN, NAME_PATTERN, ROLES, KeysFileError, key_digest, parse_keys, parse_keys_file

KEY_PREFIX = "bis_"  # recognisable in a leaked-secret scan


def _split(values: list[str]) -> list[str]:
    return [part.strip() for value in values for part in value.split(",") if part.strip()]


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def toml_block(name: str, digest: str, brands: list[str], roles: list[str], per_minute: int) -> str:
    lines = [
        "[[key]]",
        f"name = {json.dumps(name)}",
        f'sha256 = "{digest}"',
        f"brands = [{', '.join(json.dumps(b) for b in brands)}]",
        f"roles = [{', '.join(json.dumps(r) for r in roles)}]",
    ]
    if per_minute:
        lines.append(f"requests_per_minute = {per_minute}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m app.keys", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    new = commands.add_parser("new", help="make a key; prints it once and its [[key]] block")
    new.add_argument("--name", required=True, help="shown in logs and metrics (letters, digits, . _ -)")
    new.add_argument("--brands", required=True, nargs="+", help="brand ids or glob patterns ('acme*'); '*' = all")
    new.add_argument("--roles", required=True, nargs="+", help=f"one or more of {', '.join(ROLES)}")
    new.add_argument("--requests-per-minute", type=int, default=0, help="0 = unlimited (the default)")
    check = commands.add_parser("check", help="parse a keys file as the service would")
    check.add_argument("file")
    args = parser.parse_args(argv)

    if args.command == "check":
        try:
            keys = parse_keys_file(args.file)
        except KeysFileError as exc:
            print(exc, file=sys.stderr)
            return 1
        for _, caller in keys:
            print(f"{caller.name}: brands {', '.join(caller.brands)}; roles {caller.describe_roles()}; "
                  f"{caller.requests_per_minute or 'unlimited'} requests per minute")  # fmt: skip
        return 0

    brands, roles = _split(args.brands), _split(args.roles)
    problems = []
    if not NAME_PATTERN.fullmatch(args.name):
        problems.append("--name must be 1-64 letters, digits, '.', '_' or '-'")
    problems += [f"brand pattern {b!r} is not valid" for b in brands if not BRAND_GLOB_PATTERN.fullmatch(b)]
    problems += [f"role {r!r} is not one of {', '.join(ROLES)}" for r in roles if r not in ROLES]
    if args.requests_per_minute < 0:
        problems.append("--requests-per-minute must be >= 0")
    if problems:
        print("\n".join(problems), file=sys.stderr)
        return 2
    key = new_key()
    block = toml_block(args.name, key_digest(key), brands, roles, args.requests_per_minute)
    parse_keys(block)  # the block is what the service accepts
    print(f"key (shown once; give it to the caller, it is stored nowhere):\n\n    {key}\n")
    print("add this to API_KEYS_FILE (the service picks it up within 2 s, or on SIGHUP):\n")
    print(block, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
