"""The per-pixel half of inference for a whole batch at once, on the windows' device: tight
boxes, box and mask NMS in rounds, dense pastes and COCO runs, their memory budgets, the
device routines' host planning (hostwork), non-blocking uploads and the containers that
carry windows and proposals through. May import ifcn.ops, ifcn.config and
ifcn.tools.opcount's stage marks; never ifcn.inference, training or the pipeline.
"""
