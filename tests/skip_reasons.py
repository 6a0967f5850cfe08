"""How a skip says why, in the report `.ci/run` prints. Only the tests marked `real_photos` may
skip there (where ../shared/data is absent); any other skip fails the run."""

MISSING_DATA = "missing data:"
MISSING_BROWSER = "missing browser:"
REAL_PHOTOS_MARK = "real_photos"  # the marker of tests that only real photos can run
