"""openmm-ml plugin: ``MLPotential('openmm-stable', modelPath=...)``.

Registered through the ``openmmml.potentials`` entry point. openmm-ml imports this
module while it is itself being imported, so this module imports nothing of ours at the
top level (that would be a circular import through `openmm_stable.export`).
"""
from openmmml.mlpotential import MLPotentialImpl, MLPotentialImplFactory


class OpenMMStablePotentialImpl(MLPotentialImpl):
    """A model file written by openmm-stable (`save_model`, pretrain or refine output)."""

    def __init__(self, name: str, modelPath=None, dtype: str = "float32"):
        if modelPath is None:
            raise ValueError("MLPotential('openmm-stable') needs modelPath=<a model file written by openmm-stable>")
        self.model_path = modelPath
        self.dtype = dtype

    def addForces(self, topology, system, atoms, forceGroup, **args):
        import torch

        from openmm_stable.export import add_model_force

        add_model_force(system, topology, self.model_path, atoms=atoms, force_group=forceGroup,
                        dtype=getattr(torch, self.dtype))


class OpenMMStablePotentialImplFactory(MLPotentialImplFactory):
    def createImpl(self, name: str, **args):
        return OpenMMStablePotentialImpl(name, **args)
