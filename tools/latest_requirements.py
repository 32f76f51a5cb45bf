"""Prints pyproject.toml's requirements (with the dev, gguf and cluster extras) without their upper bounds: what
`make test-latest` installs to try the newest releases before a bound is raised.

torch keeps the locked release unless LATEST_TORCH names another requirement (e.g. LATEST_TORCH=torch for
the newest allowed by nothing but the lower bound): on these machines only the locked CPU build lies on disk,
and any other release is a CUDA build of several GB.
"""
import os
import re
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]
UPPER = re.compile(r"^\s*(<=|<|~=|==)")


def uncapped(requirement: str) -> str:
    name, spec = re.match(r"^([A-Za-z0-9_.\-\[\]]+)(.*)$", requirement).groups()
    kept = [part for part in spec.split(",") if part.strip() and not UPPER.match(part)]
    return name + ",".join(p.strip() for p in kept)


def locked(name: str) -> str:
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        if line.lower().startswith(f"{name}=="):
            return line.strip()
    sys.exit(f"{name} is not in requirements.lock: run `make lock`")


def main() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in ("dev", "gguf", "cluster"):
        reqs += project["optional-dependencies"][extra]
    for req in reqs:
        if re.match(r"^torch\b", req):
            print(os.environ.get("LATEST_TORCH") or locked("torch"))
        else:
            print(uncapped(req))


if __name__ == "__main__":
    main()
