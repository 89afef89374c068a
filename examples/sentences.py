"""Sentences for the MiniLM quantization benchmark: 64 to calibrate on, 200 others to evaluate.

The two sets do not overlap. ``EVALUATION`` is 80 written sentences plus 120 built from
templates over varied topics (seeded, so the set is fixed); lengths run from two words to
long compound sentences, with questions, commands, numbers, names and code-like text.
"""

from __future__ import annotations

import random

__all__ = ["CALIBRATION", "EVALUATION"]

CALIBRATION: tuple[str, ...] = (
    "The weather today is sunny with a light breeze from the west.",
    "Stock markets fell sharply after the central bank's announcement.",
    "How do I reset my password if I no longer have access to my email?",
    "She played the violin at the concert last night.",
    "Quantum computers use qubits that can exist in superposition.",
    "The recipe calls for two cups of flour, one egg and a pinch of salt.",
    "Our team won the championship game in overtime.",
    "Please send me the quarterly report by Friday afternoon.",
    "A neural network learns by adjusting its weights with gradient descent.",
    "The museum is closed on Mondays.",
    "He forgot his umbrella and got soaked on the way home.",
    "What time does the next train to Berlin leave?",
    "Photosynthesis converts sunlight, water and carbon dioxide into sugar.",
    "The new smartphone has a faster processor and a better camera.",
    "I can't believe how quickly the summer went by.",
    "The committee postponed its decision until next month.",
    "Add the onions and fry them until they are golden brown.",
    "Volcanic eruptions can affect the global climate for years.",
    "My grandmother tells the best stories about her childhood.",
    "The software update fixed several security vulnerabilities.",
    "Is there a pharmacy open near the station at this hour?",
    "Elephants communicate with low-frequency sounds over long distances.",
    "The defendant pleaded not guilty to all charges.",
    "Turn left at the second traffic light and park behind the bakery.",
    "Inflation reached its highest level in a decade.",
    "They adopted a small dog from the local shelter.",
    "The spacecraft entered orbit around Mars after a seven-month journey.",
    "Can you recommend a good book about ancient Rome?",
    "The hospital hired twenty new nurses this year.",
    "Heavy rain caused flooding in several coastal towns.",
    "The function returns None when the list is empty.",
    "I'd like a table for four at eight o'clock, please.",
    "The orchestra rehearsed the symphony for three weeks.",
    "Solar panels are becoming cheaper and more efficient.",
    "Our flight was delayed by two hours because of fog.",
    "The children built a sandcastle on the beach.",
    "Regular exercise improves both physical and mental health.",
    "The company reported record profits in the last quarter.",
    "Where did you put the keys to the garage?",
    "The bridge was built in 1932 and renovated in 2005.",
    "Bees play a crucial role in pollinating crops.",
    "The professor explained the theorem with a simple example.",
    "This restaurant serves the best noodles in town.",
    "Wildfires spread rapidly through the dry forest.",
    "The election results will be announced tomorrow morning.",
    "He has been learning Japanese for two years.",
    "The database query took almost ten seconds to finish.",
    "Don't forget to water the plants while I'm away.",
    "The marathon route passes through the old town.",
    "Scientists discovered a new species of frog in the rainforest.",
    "The printer on the third floor is out of paper again.",
    "Why is the sky blue during the day and red at sunset?",
    "The startup raised fifty million dollars in its latest round.",
    "Cats often sleep for more than twelve hours a day.",
    "The court ruled in favour of the workers' union.",
    "Mix the paint thoroughly before applying the first coat.",
    "Traffic was heavy on the highway this morning.",
    "The novel won several literary awards.",
    "Our internet connection keeps dropping every few minutes.",
    "The glacier has retreated by two kilometres since 1950.",
    "Thank you so much for your help yesterday!",
    "The vaccine showed ninety percent efficacy in clinical trials.",
    "A gentle breeze rustled the leaves of the old oak tree.",
    "Compile the project with optimisations enabled before benchmarking.",
)

_WRITTEN: tuple[str, ...] = (
    "I love hiking in the mountains during autumn.",
    "The cat is sleeping on the sofa.",
    "Interest rates rose again this quarter.",
    "Could you help me carry these boxes upstairs?",
    "The chef prepared a five-course meal for the guests.",
    "Machine translation has improved dramatically in recent years.",
    "The train was cancelled due to a signal failure.",
    "She graduated with honours in mechanical engineering.",
    "Hurricanes form over warm ocean water.",
    "The library extended its opening hours for the exam period.",
    "My laptop battery drains too quickly.",
    "The city council approved the new cycling lanes.",
    "Is it going to snow this weekend?",
    "The ancient temple attracts thousands of tourists every year.",
    "He scored two goals in the final ten minutes.",
    "Wash your hands before preparing food.",
    "The telescope captured images of a distant galaxy.",
    "Unemployment fell to its lowest level since 2008.",
    "They are planning a trip to Portugal next spring.",
    "The algorithm sorts the array in linear time for small integers.",
    "A loud noise woke me up in the middle of the night.",
    "The pharmacy ran out of cough syrup.",
    "Sea levels are rising because of melting ice sheets.",
    "I need to renew my passport before the trip.",
    "The jazz band played until two in the morning.",
    "Fresh bread smells wonderful.",
    "The patient recovered fully after the surgery.",
    "What is the capital of Australia?",
    "Our neighbours are renovating their kitchen.",
    "The river froze completely during the cold winter.",
    "The manager praised the team for meeting the deadline.",
    "Electric cars need fewer maintenance visits than petrol cars.",
    "Please turn off the lights when you leave the room.",
    "The documentary explores life in the deep ocean.",
    "The price of coffee has doubled over the past year.",
    "Children learn languages faster than adults.",
    "The storm knocked down power lines across the region.",
    "I prefer tea to coffee in the morning.",
    "The museum acquired a rare painting by a Dutch master.",
    "Set the oven to 180 degrees and bake for forty minutes.",
    "The senator announced she would not seek re-election.",
    "Penguins cannot fly but they are excellent swimmers.",
    "The meeting has been moved to conference room B.",
    "He apologised for being late to the interview.",
    "Our garden is full of tomatoes this summer.",
    "The earthquake measured 6.2 on the Richter scale.",
    "Read the instructions carefully before assembling the shelf.",
    "Who wrote the screenplay for that film?",
    "The bakery on the corner sells excellent croissants.",
    "The server returned a 500 error after the deployment.",
    "Migratory birds fly thousands of kilometres each year.",
    "The bank offers lower fees for students.",
    "The toddler refused to eat his vegetables.",
    "Astronauts exercise daily to prevent muscle loss in space.",
    "The concert tickets sold out within minutes.",
    "I'm sorry, I didn't catch your name.",
    "The factory will switch to renewable energy by 2030.",
    "The detective found a crucial clue in the letter.",
    "Yoga helps me relax after a long day at work.",
    "The river delta supports a rich ecosystem.",
    "Variables declared inside the loop are not visible outside it.",
    "The airport introduced faster security checks.",
    "My sister is allergic to peanuts.",
    "The team celebrated their victory with a parade.",
    "Coral reefs are threatened by warming seas.",
    "Let's meet at the café after lunch.",
    "The government announced new tax rules for small businesses.",
    "The puppy chewed through the phone charger.",
    "Mathematics is the language of physics.",
    "The festival features music from around the world.",
    "Ok.",
    "Good morning everyone!",
    "Absolutely not.",
    "Where are you?",
    "The results, although preliminary, suggest that the treatment reduces symptoms in "
    "most patients, especially when it is started early and combined with rest.",
    "After the merger, the two companies kept separate brands but shared their research "
    "labs, their distribution network and, eventually, their headquarters in Toronto.",
    "If the input tensor is not contiguous, the kernel copies it into a temporary buffer "
    "before launching, which costs memory bandwidth but keeps the inner loop simple.",
    "On the third day of the expedition the climbers reached the ridge, where the wind was "
    "so strong that they had to crawl the last hundred metres to the shelter.",
    "Order #4521 shipped on 12 March and should arrive within 3-5 business days.",
    "def add(a, b): return a + b",
)

_SUBJECTS = ("The new mayor", "A young engineer", "My neighbour", "The research team",
             "Our teacher", "The football club", "A local farmer", "The airline",
             "The startup", "An old fisherman", "The hospital", "The orchestra",
             "The city library", "A famous author", "The government", "The children",
             "The software company", "The police", "A group of students", "The bakery")
_VERBS = ("announced plans for", "complained about", "is excited about", "wrote a report on",
          "spent the weekend discussing", "organised a meeting about", "criticised",
          "received an award for", "asked for more money for", "published a study about",
          "made a short film about", "voted against", "started a campaign for",
          "refused to comment on", "is worried about")
_OBJECTS = ("the price of electricity", "the new railway line", "climate change",
            "the school holidays", "artificial intelligence", "the football season",
            "the flooded roads", "a rare species of owl", "the housing shortage",
            "the summer festival", "online privacy", "the broken elevator",
            "the vaccination programme", "the water supply", "tourism in the old town",
            "the night buses", "the chess tournament", "ocean pollution")
_TAILS = ("", " yesterday", " last week", " on Tuesday", " after the storm",
          " during the press conference", " despite the criticism", " in the local newspaper",
          " for the third time this year", " before the holidays")


def _templated(n: int, seed: int = 7) -> list[str]:
    rng = random.Random(seed)
    out: list[str] = []
    seen: set[str] = set(CALIBRATION) | set(_WRITTEN)
    while len(out) < n:
        s = (f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}"
             f"{rng.choice(_TAILS)}.")
        if rng.random() < 0.2:
            s = "Why " + s[0].lower() + s[1:-1] + "?"
        if s not in seen:
            seen.add(s)
            out.append(s)
    return out


EVALUATION: tuple[str, ...] = _WRITTEN + tuple(_templated(200 - len(_WRITTEN)))
assert len(CALIBRATION) == 64 and len(EVALUATION) == 200
assert not set(CALIBRATION) & set(EVALUATION)
