"""Data: intensity mappings, degradations, the CT phantom, patch sampling, datasets and preprocessing.

Submodules are imported where used (`revgan_med.data.transforms`, `.degradation`, `.phantom`,
`.sampling`, `.datasets`, `.preprocess`) so importing one does not pull in the others' dependencies.
"""
