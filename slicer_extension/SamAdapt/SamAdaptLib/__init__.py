"""Pure-Python logic of the SamAdapt Slicer module (no slicer, qt, vtk or torch imports).

- :mod:`.geometry`: RAS <-> IJK, slicing axis from a slice view, boxes from markups/ROIs.
- :mod:`.regions`: changed-region patches into label arrays, local undo/redo history.
- :mod:`.session`: one interactive session driving a client and writing changes into segments.
- :mod:`.localserver`: start/stop ``samadapt serve`` on 127.0.0.1.
- :mod:`.client`: the stdlib HTTP client of ``samadapt serve``.

Submodules are imported by their users, not here, so importing the package costs nothing.
"""
