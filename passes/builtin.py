"""Imports every built-in pass module so that their @register_pass decorators run."""
from __future__ import annotations

from optc.passes import eliminate_dead_code, fold_batchnorm, fold_constants, remove_identity  # noqa: F401
