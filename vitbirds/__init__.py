"""vitbirds: a Vision Transformer for bird species, written from scratch in PyTorch.

Where things are decided, one file each:
- a recipe value's default (epochs, batch, learning rate, depth, ...): `presets.py`, the default
  preset written over the fields of `config.py` (which carry each flag's help);
- a run setting's default (workers, device, precision, storage, tracker, export): `settings.py`;
- what a model reference names (a directory, a run, gs://, models:/NAME@ALIAS):
  `lifecycle/store.py`;
- where outputs and the cache go: `paths.py`.

The packages are stages, and imports only run down them (tests/test_layout.py checks it):
ray_adapter -> training -> settings -> inference -> monitoring -> evaluation -> data -> lifecycle
-> model -> core (the top-level modules); `serve/` and `jobs/` sit above the library.
"""

__version__ = "0.1.0"
