import os
import sys

# tests import helpers from each other (e.g. tiny model configs in test_model.py)
sys.path.insert(0, os.path.dirname(__file__))
