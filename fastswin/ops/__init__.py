"""torch.library registrations: the only place that touches ``torch.library``.

Each file registers one op per backend (schema, fake/meta kernel, autograd) and plugs the
backend into :mod:`fastswin.backends`.
"""
