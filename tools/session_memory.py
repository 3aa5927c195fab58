"""Peak resident memory of a process that creates one onnxruntime session for an ONNX file (default session
options, ``--threads`` intra-op threads), Python and onnxruntime's import included.

    python tools/session_memory.py OUT/model.onnx [OTHER.onnx ...]

Each file is measured in a fresh process; prints one line per file.
"""

from __future__ import annotations

import argparse
import subprocess
import sys


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="+")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        import resource

        import onnxruntime as ort

        imported = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        options = ort.SessionOptions()
        options.intra_op_num_threads = args.threads
        ort.InferenceSession(args.models[0], options)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"{args.models[0]}: {peak:.0f} MB after the session ({imported:.0f} MB after the import)")
        return 0
    for model in args.models:
        subprocess.run([sys.executable, __file__, model, "--one", "--threads", str(args.threads)], check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
