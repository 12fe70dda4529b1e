import os
import sys
from pathlib import Path

import torch

# Test helpers (the naive spec transcription) live beside the tests.
sys.path.insert(0, str(Path(__file__).parent))

# Without a GPU the Triton kernels run in Triton's interpreter (set before triton is first imported).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
