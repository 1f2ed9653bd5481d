"""The soak (bench/soak.py runs it), split by concern:

common     constants and figures          plan      the seeded plan of the load
processes  gunicorn, workers, beat        database  the scratch database, organizations, drain
faults     worker kills, Redis restart    load      the plan run against the stack
checks     what must hold after the drain main      arguments, the run, the report
"""
