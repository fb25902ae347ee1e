"""Class-agnostic COCO average recall of mask proposals (pycocotools), as the paper reports it.
May import ifcn.inference (to run a predictor) and ifcn.config; never the pipeline.
"""
