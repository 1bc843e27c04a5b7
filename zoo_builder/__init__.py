"""zoo_builder: the personalized-model zoo Tina learns from.

Data flow, one file each: config (typed settings) → tasks (which classes, which order) → generic
(one model on every class) → fit (many personalized models fine-tuned together, batched) →
shards (webdataset tar files, vocabulary, manifest) → build (orchestration, resume, CLI).
`tina` never imports this package; `tina zoo build` calls `zoo_builder.build.main`.
"""
