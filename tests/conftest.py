import os

# Keep torch from oversubscribing the 2-core CI machine when Ray workers run beside pytest.
os.environ.setdefault("OMP_NUM_THREADS", "2")
