"""Plain PyTorch oracle for every op. Imports no kernel; any float dtype (float64 included),
any device. Each function follows the original code named in its module's docstring to the bit.

* :mod:`.bilinear` -- DAT's grid_sample
* :mod:`.swin` -- Swin V1 / V2 window attention (timm semantics)
* :mod:`.dat` -- DAT and DAT++ deformable attention (LeapLabTHU/DAT commits 42b489e and 2f31405)
* :mod:`.neighborhood` -- NATTEN 2-D neighborhood attention (DAT++ "N" blocks)
"""
