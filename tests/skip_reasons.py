"""How a skip says why, so that `.ci/run` can tell a skip for missing data or a missing browser
(a failure there: CI would be green while testing little) from any other."""

MISSING_DATA = "missing data:"
MISSING_BROWSER = "missing browser:"
REAL_PHOTOS_MARK = "real_photos"  # the marker of tests that only real photos can run
