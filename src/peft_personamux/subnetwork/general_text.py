"""A fixed, modern, non-Shakespeare text: the loss on it shows whether a mask simply breaks the model.

Written for this project (plain expository English on everyday topics; no source text), so it is in no training
set of the personas and never changes between runs.
"""

GENERAL_TEXT = """\
Water boils at a lower temperature on a mountain than at sea level, because the air pressure is lower. Cooks who \
live at high altitude often add a few minutes to the time it takes to boil pasta or eggs.

A library card is one of the most useful things a person can own. With it you can borrow books, films and music, \
use the computers, and in many towns attend free classes on subjects such as budgeting, gardening or writing a CV.

To change a flat tyre, park on level ground, switch on the hazard lights and apply the handbrake. Loosen the wheel \
nuts slightly before raising the car with the jack, then remove the nuts, swap the wheel and tighten the nuts in a \
star pattern.

The human heart beats about one hundred thousand times a day. Regular exercise, enough sleep and a diet with plenty \
of vegetables help to keep blood pressure in a healthy range.

When you write an email to someone you have not met, keep it short. Say who you are in the first sentence, explain \
what you need, and end with a clear question so that the reader knows how to reply.

Trains in many European countries run on electricity taken from overhead wires. A device on the roof called a \
pantograph presses against the wire and carries the current down to the motors.

Bread rises because yeast feeds on the sugars in flour and releases carbon dioxide. The gas is trapped by a network \
of gluten, which stretches as the dough is kneaded and gives the loaf its structure.

The first computers filled entire rooms and used thousands of vacuum tubes. Today a mobile phone holds far more \
memory and processing power than those machines, and it runs all day on a small battery.

Recycling works best when materials are clean and sorted. Rinse bottles and tins, flatten cardboard boxes, and check \
the local rules, since not every kind of plastic can be collected in every area.

The Moon takes about twenty-nine and a half days to pass through all of its phases. Its gravity pulls on the oceans \
and causes the tides, which rise and fall roughly twice a day along most coastlines.
"""
