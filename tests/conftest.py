import atexit
import os
import shutil
import sys
import tempfile

from hypothesis import HealthCheck, settings

# Every run a test starts, in this process or a child, puts its decoded-data cache here, never in
# the user's cache folder (tests that check the cache itself pass their own tmp_path).
os.environ["IMAGETX_CACHE_DIR"] = tempfile.mkdtemp(prefix="imagetx-test-cache-")
atexit.register(shutil.rmtree, os.environ["IMAGETX_CACHE_DIR"], ignore_errors=True)

# what the tests share lives in tests/support/ (`from support.configs import tiny`): no test file
# imports another
sys.path.insert(0, os.path.dirname(__file__))

# Property tests draw model geometries with Hypothesis. The default profile is deterministic (the
# same examples on every run, no example database) so CI cannot flake; IMAGETX_HYPOTHESIS=thorough
# draws ten times as many, fresh ones each run, to search the configuration space harder.
_common = dict(deadline=None, print_blob=True, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("ci", derandomize=True, database=None, **_common)
settings.register_profile("thorough", max_examples=10 * settings.default.max_examples, **_common)
settings.load_profile(os.environ.get("IMAGETX_HYPOTHESIS", "ci"))
