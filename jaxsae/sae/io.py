"""The old names of SAE export, kept while tests/conftest.py, tests/test_store_gcs.py and
tests/test_train_gcs.py still import them: each library's layout is read and written by its
module in `jaxsae.formats`, which new code imports."""

from jaxsae.formats import stored as load  # noqa: F401
from jaxsae.formats.saelens import write as save_saelens  # noqa: F401
from jaxsae.formats.sparsify import write as save_sparsify  # noqa: F401
