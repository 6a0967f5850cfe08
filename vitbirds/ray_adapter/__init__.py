"""The only place in the library that imports Ray: Ray Train (`train`), Ray Tune (`tune`), the
Ray data-loader glue (`data`) and job submission to a cluster (`submit`). Everything else in
`vitbirds` runs without Ray."""
