"""Plots (matplotlib, the optional extra ``pip install fastjac[plot]``); each module imports matplotlib lazily.

    fastjac.plot.lyapunov  - a Lyapunov spectrum and the convergence of its exponents
    fastjac.plot.spectra   - eigenvalues in the complex plane, spectral norm against sequence length
    fastjac.plot.energy    - pseudo-energy and contribution index against step
"""
