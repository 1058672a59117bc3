"""openmm-stable: stability-aware training of ML force fields with OpenMM."""
__version__ = "0.1.0"
