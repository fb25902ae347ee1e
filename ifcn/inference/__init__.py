"""Multi-scale inference of whole batches (the predictor) and the two ways of making one
image's proposals. May import ifcn.models, ifcn.batch, ifcn.ops and ifcn.config;
never training, evaluation or the pipeline.
"""
