"""Hash the evaluation protocol's text and token ids under this Python, to show two machines evaluate the
same tokens (the text ships pinned with graphpress; ``pydoc_data.topics`` differs between 3.11 and 3.12).

    python tools/eval_tokens.py TOKENIZER_DIR      (a saved tokenizer: tokenizer.json and its config)
"""

from __future__ import annotations

import hashlib
import json
import sys

import numpy as np
from transformers import AutoTokenizer

from graphpress import evaluation as ev


def main() -> None:
    tok = AutoTokenizer.from_pretrained(sys.argv[1])
    text = ev.corpus_text()
    ids = ev.token_stream(tok).numpy().astype(np.int64)
    print(json.dumps({"python": sys.version.split()[0], "text_sha256": hashlib.sha256(text.encode()).hexdigest(),
                      "tokens": int(ids.size), "ids_sha256": hashlib.sha256(ids.tobytes()).hexdigest()}))


if __name__ == "__main__":
    main()
