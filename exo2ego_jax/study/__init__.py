"""The controlled study on the synthetic ego-exo task: variants as chains of real stage runs with matched budgets
(`runs`), running them exactly as users do (`chain`), linear probes of where the action is present in each
stage's features (`probes`), and the tables (`report`).

It sits above train, serve and eval (it drives the launch scripts and scores their exports); nothing below
imports it. `launch/ablate.py`, `launch/probe.py` and `launch/demo.py` are its command lines.
"""
