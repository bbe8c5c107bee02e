"""Using trained weights: multi-view evaluation, prediction, feature extraction, reconstruction figures.

Every command starts from `weights.load_weights(path)`, which reads any of our exports, a
DeepSpeed checkpoint folder or a public VideoMAE (V2) checkpoint without unpickling code.
"""
