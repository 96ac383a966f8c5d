"""Analyses of VISOR and dense-layout models (the layer-drop analysis)."""
