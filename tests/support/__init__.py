"""What tests build on, apart from the tests themselves.

factories.py  rows a test starts from (`new_org`), made through core's own functions
db.py         `tx(engine, fn, ...)`: a core function as one committed unit of work (and the
              `db` fixture, the same bound to the test's engine)
fakes/        real HTTP servers on 127.0.0.1 standing in for PayPal, Stripe, Twilio and a
              host's event endpoint, plus in-process doubles
payloads/     webhook bodies and signatures as PayPal and Stripe send them
api.py, topups.py, events.py  helpers of the /v1, top-up and outbound-event tests
"""
