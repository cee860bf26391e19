"""``python -m evidence FILE...``: print what each file says about its own origin, as JSON.

    python -m evidence [--trust-anchors PEM_FILE] [--no-watermark] [--brief] FILE...

Prints one JSON list, one object per file: ``{"file": PATH, **read_evidence(PATH)}`` (``--brief``: only file, says,
strong, summary and errors). Exit status 0, or 2 for a usage error; unreadable files are reported in their ``errors``.
"""

from __future__ import annotations

import argparse
import json
import sys

from . import read_evidence


def main(argv=None) -> int:
    prog = sys.argv[0] if sys.argv and sys.argv[0].startswith("bayesfake") else "python -m evidence"
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+", metavar="FILE")
    parser.add_argument("--trust-anchors", metavar="PEM_FILE", help="PEM certificates to trust as C2PA signers")
    parser.add_argument("--no-watermark", action="store_true", help="skip the invisible-watermark pixel decode")
    parser.add_argument("--brief", action="store_true", help="only file, says, strong, summary and errors")
    args = parser.parse_args(argv)
    anchors = None
    if args.trust_anchors:
        with open(args.trust_anchors, encoding="utf-8") as f:
            anchors = f.read()
    out = []
    for path in args.files:
        result = read_evidence(path, trust_anchors=anchors, check_watermark=not args.no_watermark)
        if args.brief:
            result = {k: result[k] for k in ("says", "strong", "summary", "errors")}
        out.append({"file": path, **result})
    json.dump(out, sys.stdout, indent=2, ensure_ascii=False)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
