"""The torch thread count of the test processes and every process they start: 1, or PTI_TEST_THREADS=2 (any
count) to run the suite on more. Results compared across processes stay comparable because all use this count."""

import os

TORCH_THREADS = int(os.environ.get("PTI_TEST_THREADS", "1"))
