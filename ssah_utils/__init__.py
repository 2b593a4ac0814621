"""ssah_utils: the helper package behind the notebooks of the `ssah` artifact.

Reproduces "Superficial Safety Alignment Hypothesis" (Li & Kim, ICLR 2026) on a model organism
trained in-repo (default) or on real Hugging Face chat models. Compute lives here; the numbered
notebooks in `notebooks/` call one function per step and look at the result.
"""

__version__ = "0.1.0"
