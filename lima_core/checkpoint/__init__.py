"""Everything on disk: atomic writes (atomic), the collective sharded-folder writer (sharded), HF
import and export (hf), the sharded train state (state) and the run folder's lock and
fingerprint (run_folder).
"""
