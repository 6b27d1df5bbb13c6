"""DeepReg compatibility: its configs imported (and upgraded), its prediction layout written."""
