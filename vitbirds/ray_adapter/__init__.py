"""The only place in the library that imports Ray: Ray Train (`train`), Ray Tune (`tune`) and the
Ray data-loader glue (`data`). Everything else in `vitbirds` runs without Ray."""
