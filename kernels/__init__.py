"""Raw kernels of fastattn, one subpackage per backend (see README.md in this folder for the contract)."""
