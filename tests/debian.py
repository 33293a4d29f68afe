"""Install Debian packages a test needs (as CI does on a fresh machine), or say why not."""
from __future__ import annotations

import os
import shutil
import subprocess


class Unavailable(RuntimeError):
    """The packages can't be installed here (not root, no apt-get, apt failed): a reason to skip."""


def apt_install(packages: tuple[str, ...], what: str, log=print) -> None:
    """``apt-get update && apt-get install -y packages``; raise Unavailable with the reason."""
    if os.geteuid() != 0:
        raise Unavailable(f"{what} is not installed and installing it needs root: apt-get install {' '.join(packages)}")
    if shutil.which("apt-get") is None:
        raise Unavailable(f"{what} is not installed and there is no apt-get to install {' '.join(packages)}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    log(f"installing {' '.join(packages)} with apt-get ({what})")
    for cmd in (["apt-get", "update"], ["apt-get", "install", "-y", *packages]):
        try:
            r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)
        except subprocess.TimeoutExpired:
            raise Unavailable(f"{' '.join(cmd)} timed out after 20 minutes") from None
        if r.returncode != 0:
            raise Unavailable(f"{' '.join(cmd)} failed ({r.returncode}): {(r.stderr or r.stdout).strip()[-800:]}")
