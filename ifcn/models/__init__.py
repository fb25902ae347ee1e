"""The networks (InstanceFCN, DeepMask's heads, the FCN baseline), the registry that names
them, and checkpoints. May import torch, ifcn.config and ifcn.io; never inference,
training or the pipeline. Kept light: checkpoint_header imports without torch.
"""
