"""Plots (matplotlib, the optional extra ``pip install fastjac[plot]``); each module imports matplotlib lazily.

fastjac.plot.lyapunov  - a Lyapunov spectrum and the convergence of its exponents
fastjac.plot.spectra   - eigenvalues in the complex plane (with the unit circle), spectral norm against sequence
                         length (plot_eigenvalues, plot_norm_vs_length)
fastjac.plot.energy    - pseudo-energy, its linearisations and contribution index against step, and energies
                         along the energy-based flows (plot_pseudo_energy, plot_energy_flow)
"""
