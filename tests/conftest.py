import os
import sys

# tests import the top-level modules (rubric, judge, rollout, ...) from the repository root
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.chdir(ROOT)  # tests read data/ and run the scripts by relative path, from any working directory
