import os
import sys

# progress bars of the contenders (TransformerLens' sweep draws one per call) would bury the progress lines;
# tqdm reads this when it is first imported
os.environ.setdefault("TQDM_DISABLE", "1")

from .run import main  # noqa: E402

sys.exit(main())
