"""The soak (bench/soak.py runs it), split by concern:

common     constants and figures          model     deliveries, payments, the stack posted to
plan       the seeded plan of the load    payments  its provider actions (PayPal, Stripe)
sends      its messages and callbacks     processes gunicorn, workers, beat
database   scratch database, drain        faults    worker kills, Redis restart
load       the plan run against the stack checks    what must hold after the drain
main       arguments, the run, the report
"""
