"""Write the bundled preference set: data/train.jsonl (300 pairs) and data/test.jsonl (100 held-out pairs).

    python data/make_pairs.py            # rewrites both files; the same seed gives byte-identical files

Short questions whose answers even 135M-270M models can tell apart, in five kinds: arithmetic (right vs off-by-a-
little answer), capitals (the capital vs a big city of the same country or another capital), everyday facts
(legs, opposites, colours, days, months, plurals, general knowledge), and helpful vs evasive replies. Every prompt
occurs once; train and test have disjoint prompts, split 3:1 within each kind. All facts and replies were written
for this project.

Format (TRL's): {"prompt": "Question: ...\\nAnswer:", "chosen": " ...", "rejected": " ..."}. The prompt ends where
the answer begins and responses start with a space, so the plain-text join prompt + response reads naturally for
base models; models with a chat template get the same strings as a user turn and an assistant turn.
"""

import argparse
import json
import os
import random

CAPITALS = [  # (country, capital, a tempting wrong answer or None for "another country's capital")
    ("France", "Paris", "Lyon"), ("Germany", "Berlin", "Munich"), ("Italy", "Rome", "Milan"),
    ("Spain", "Madrid", "Barcelona"), ("Portugal", "Lisbon", "Porto"), ("United Kingdom", "London", "Manchester"),
    ("Ireland", "Dublin", "Cork"), ("Netherlands", "Amsterdam", "Rotterdam"), ("Belgium", "Brussels", "Antwerp"),
    ("Switzerland", "Bern", "Zurich"), ("Austria", "Vienna", "Salzburg"), ("Poland", "Warsaw", "Krakow"),
    ("Greece", "Athens", "Thessaloniki"), ("Sweden", "Stockholm", "Gothenburg"), ("Norway", "Oslo", "Bergen"),
    ("Finland", "Helsinki", "Tampere"), ("Denmark", "Copenhagen", "Aarhus"), ("Russia", "Moscow", "Saint Petersburg"),
    ("Turkey", "Ankara", "Istanbul"), ("Egypt", "Cairo", "Alexandria"), ("Morocco", "Rabat", "Casablanca"),
    ("Nigeria", "Abuja", "Lagos"), ("Kenya", "Nairobi", "Mombasa"), ("South Africa", "Pretoria", "Durban"),
    ("Ethiopia", "Addis Ababa", None), ("Ghana", "Accra", None), ("India", "New Delhi", "Mumbai"),
    ("Pakistan", "Islamabad", "Karachi"), ("China", "Beijing", "Shanghai"), ("Japan", "Tokyo", "Osaka"),
    ("South Korea", "Seoul", "Busan"), ("Vietnam", "Hanoi", "Ho Chi Minh City"), ("Thailand", "Bangkok", None),
    ("Indonesia", "Jakarta", "Surabaya"), ("Philippines", "Manila", "Cebu"), ("Australia", "Canberra", "Sydney"),
    ("New Zealand", "Wellington", "Auckland"), ("Canada", "Ottawa", "Toronto"), ("United States", "Washington, D.C.",
    "New York"), ("Mexico", "Mexico City", "Guadalajara"), ("Brazil", "Brasilia", "Rio de Janeiro"),
    ("Argentina", "Buenos Aires", "Cordoba"), ("Chile", "Santiago", "Valparaiso"), ("Peru", "Lima", "Cusco"),
    ("Colombia", "Bogota", "Medellin"), ("Cuba", "Havana", None), ("Iran", "Tehran", "Isfahan"),
    ("Iraq", "Baghdad", "Basra"), ("Saudi Arabia", "Riyadh", "Jeddah"), ("Israel", "Jerusalem", "Tel Aviv"),
    ("Ukraine", "Kyiv", "Lviv"), ("Hungary", "Budapest", None), ("Czech Republic", "Prague", "Brno"),
    ("Romania", "Bucharest", "Cluj-Napoca"), ("Iceland", "Reykjavik", None), ("Scotland", "Edinburgh", "Glasgow"),
]

LEGS = [("spider", 8), ("dog", 4), ("bird", 2), ("ant", 6), ("cat", 4), ("horse", 4), ("chicken", 2), ("cow", 4),
        ("duck", 2), ("beetle", 6), ("human", 2), ("crab", 10)]
NUMBER_WORDS = {2: "Two", 4: "Four", 6: "Six", 8: "Eight", 10: "Ten"}

OPPOSITES = [("hot", "cold"), ("big", "small"), ("up", "down"), ("day", "night"), ("fast", "slow"),
             ("happy", "sad"), ("open", "closed"), ("light", "dark"), ("wet", "dry"), ("early", "late"),
             ("full", "empty"), ("hard", "soft"), ("loud", "quiet"), ("rich", "poor"), ("tall", "short"),
             ("push", "pull"), ("win", "lose"), ("first", "last"), ("inside", "outside"), ("clean", "dirty")]

COLOURS = [("the sky on a clear day", "blue"), ("grass", "green"), ("snow", "white"), ("a ripe banana", "yellow"),
           ("coal", "black"), ("blood", "red"), ("a carrot", "orange"), ("milk", "white"), ("a lemon", "yellow"),
           ("chocolate", "brown"), ("a ripe tomato", "red"), ("a fresh leaf", "green")]
COLOUR_NAMES = ["blue", "green", "white", "yellow", "black", "red", "orange", "brown", "purple", "pink"]

DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]

PLURALS = [("mouse", "mice", "mouses"), ("child", "children", "childs"), ("foot", "feet", "foots"),
           ("tooth", "teeth", "tooths"), ("man", "men", "mans"), ("woman", "women", "womans"),
           ("goose", "geese", "gooses"), ("person", "people", "peoples"), ("leaf", "leaves", "leafs"),
           ("knife", "knives", "knifes")]

GENERAL = [  # (question, right, wrong)
    ("Which planet do we live on?", "Earth.", "Mars."),
    ("How many days are in a week?", "Seven.", "Five."),
    ("How many months are in a year?", "Twelve.", "Ten."),
    ("What do bees make?", "Honey.", "Milk."),
    ("At what temperature in Celsius does water freeze?", "0 degrees.", "100 degrees."),
    ("At what temperature in Celsius does water boil at sea level?", "100 degrees.", "50 degrees."),
    ("What is the largest ocean on Earth?", "The Pacific Ocean.", "The Indian Ocean."),
    ("What is the closest star to Earth?", "The Sun.", "The Moon."),
    ("How many hours are in a day?", "Twenty-four.", "Twelve."),
    ("How many minutes are in an hour?", "Sixty.", "One hundred."),
    ("What gas do people need to breathe to live?", "Oxygen.", "Helium."),
    ("What do cows drink?", "Water.", "Milk."),
    ("Which animal is known as the king of the jungle?", "The lion.", "The rabbit."),
    ("What is frozen water called?", "Ice.", "Steam."),
    ("Who wrote Romeo and Juliet?", "William Shakespeare.", "Charles Dickens."),
    ("What is the chemical symbol for water?", "H2O.", "CO2."),
    ("Which is the largest planet in the solar system?", "Jupiter.", "Mercury."),
    ("What is the tallest mountain in the world?", "Mount Everest.", "Mount Fuji."),
    ("Which season comes after winter?", "Spring.", "Autumn."),
    ("What do caterpillars turn into?", "Butterflies or moths.", "Spiders."),
    ("How many sides does a triangle have?", "Three.", "Four."),
    ("How many sides does a square have?", "Four.", "Six."),
    ("What is the main language spoken in Brazil?", "Portuguese.", "Spanish."),
    ("What is the longest river in Africa?", "The Nile.", "The Thames."),
    ("Which organ pumps blood through the body?", "The heart.", "The liver."),
    ("What is the currency of Japan?", "The yen.", "The euro."),
    ("Which continent is Egypt in?", "Africa.", "South America."),
    ("How many continents are there?", "Seven.", "Twelve."),
    ("What color do you get by mixing blue and yellow?", "Green.", "Purple."),
    ("Which animal gives us wool?", "The sheep.", "The fish."),
]

HELPFUL = [  # (question, helpful answer); the rejected reply is an evasion
    ("How do I boil an egg?", "Put the egg in boiling water for about nine minutes, then cool it in cold water."),
    ("How can I fall asleep faster?", "Keep a regular bedtime, avoid screens for an hour before bed, and keep the "
     "room dark and cool."),
    ("How do I make a cup of tea?", "Pour boiling water over a tea bag, wait three to five minutes, then remove "
     "the bag."),
    ("What should I do if I cut my finger?", "Rinse the cut with clean water, press on it to stop the bleeding, and "
     "cover it with a bandage."),
    ("How can I save money on groceries?", "Plan your meals, write a shopping list, and buy store brands."),
    ("How do I convert kilometres to miles?", "Multiply the number of kilometres by 0.62."),
    ("How do I tie a simple knot?", "Make a loop with the rope, pass one end through the loop, and pull tight."),
    ("How can I remember new words in a language?", "Review them a little every day and use them in your own "
     "sentences."),
    ("What is a good way to start exercising?", "Start with a brisk twenty-minute walk most days and slowly add "
     "more."),
    ("How do I water a house plant?", "Water it when the top of the soil feels dry, until water drains from the "
     "bottom."),
    ("How do I write a polite email to my teacher?", "Greet them by name, state your question briefly, and thank "
     "them at the end."),
    ("How can I keep my bread fresh longer?", "Keep it in a bread box or freeze slices you will not eat soon."),
    ("How do I find the area of a rectangle?", "Multiply its length by its width."),
    ("How do I calculate an average?", "Add up all the numbers and divide by how many numbers there are."),
    ("What should I pack for a day at the beach?", "Sunscreen, water, a hat, a towel and a snack."),
    ("How do I clean a frying pan?", "Let it cool, then wash it with hot soapy water and a soft sponge."),
    ("How can I stop my glasses from fogging up?", "Wash the lenses with a drop of dish soap and let them "
     "air dry."),
    ("How do I prepare for a job interview?", "Learn about the company, practise answers to common questions, and "
     "arrive a little early."),
    ("How do I make rice?", "Rinse one cup of rice, add two cups of water, bring to a boil, then simmer covered for "
     "fifteen minutes."),
    ("How can I drink more water each day?", "Carry a water bottle and drink a glass with every meal."),
    ("How do I change a light bulb?", "Switch off the power, let the old bulb cool, unscrew it, and screw in the "
     "new one."),
    ("What is a healthy breakfast?", "Oatmeal with fruit, or eggs with whole-grain toast."),
    ("How do I make my phone battery last longer?", "Lower the screen brightness and close apps you are not "
     "using."),
    ("How do I say thank you in Spanish?", "You say gracias."),
    ("How do I say hello in French?", "You say bonjour."),
    ("How do I find the perimeter of a square?", "Multiply the length of one side by four."),
    ("How do I remove a coffee stain from a shirt?", "Rinse it with cold water as soon as possible, then rub in a "
     "little liquid soap and wash."),
    ("How can I be more productive at work?", "Make a short list of tasks each morning and do the most important "
     "one first."),
    ("How do I keep a cut flower fresh?", "Trim the stem, put it in clean water, and change the water every two "
     "days."),
    ("How do I convert Celsius to Fahrenheit?", "Multiply by 9, divide by 5, and add 32."),
    ("How can I calm down when I feel stressed?", "Take a few slow, deep breaths and go for a short walk."),
    ("How do I choose a ripe avocado?", "Press it gently: a ripe one gives a little but is not mushy."),
    ("How do I start learning to play guitar?", "Learn three basic chords and practise switching between them for "
     "ten minutes a day."),
    ("How do I write a good summary?", "State the main idea first, then the key points, in your own words."),
    ("How do I keep my laptop safe from viruses?", "Install updates, use an antivirus program, and do not open "
     "unknown attachments."),
    ("How do I make a strong password?", "Use a long phrase of several unrelated words and do not reuse it on "
     "other sites."),
    ("How do I help a friend who is sad?", "Listen to them, ask how they feel, and offer to spend time together."),
    ("How do I keep my shoes from smelling?", "Let them dry out between wears and sprinkle baking soda inside."),
    ("How do I read a map?", "Find the legend to understand the symbols, and use the compass rose to find north."),
    ("How long should I brush my teeth?", "About two minutes, twice a day."),
    ("How do I make a paper airplane?", "Fold a sheet in half lengthwise, fold the top corners to the middle, then "
     "fold the wings down."),
    ("How can I improve my handwriting?", "Write slowly, hold the pen loosely, and practise a few lines every day."),
    ("How do I cook pasta?", "Boil salted water, add the pasta, and cook it for the time on the package."),
    ("How do I keep food from sticking to the pan?", "Heat the pan first, then add a little oil before the food."),
    ("How can I wake up earlier?", "Go to bed fifteen minutes earlier each night and put your alarm across the "
     "room."),
    ("How do I measure my heart rate?", "Count the beats at your wrist for fifteen seconds and multiply by four."),
    ("How do I fix a squeaky door?", "Put a few drops of oil on the hinges and swing the door back and forth."),
    ("How should I store fresh herbs?", "Wrap them in a damp paper towel and keep them in the fridge."),
    ("What should I do before a long drive?", "Check the tyres and fuel, get a good night of sleep, and plan "
     "breaks."),
    ("How do I apologize to someone?", "Say clearly what you did wrong, say you are sorry, and offer to make it "
     "right."),
    ("How do I make lemonade?", "Mix lemon juice, water and sugar, stir well, and serve it cold."),
    ("How can I study better for exams?", "Study in short sessions, test yourself often, and sleep well before the "
     "exam."),
    ("How do I warm up before running?", "Walk for five minutes, then jog slowly and do a few leg swings."),
    ("How do I count to three in German?", "Eins, zwei, drei."),
    ("How do I find the main idea of a paragraph?", "Look for the sentence that the other sentences explain or "
     "support."),
    ("How do I keep a plant alive indoors?", "Give it bright indirect light, water it when the soil is dry, and do "
     "not overwater."),
    ("How can I reduce food waste at home?", "Buy only what you need, store leftovers well, and eat older food "
     "first."),
    ("How do I introduce myself at a meeting?", "Say your name, your role, and one sentence about what you work on."),
    ("How do I thaw frozen chicken safely?", "Leave it in the fridge overnight, not on the kitchen counter."),
    ("What is a simple way to cool down on a hot day?", "Drink cold water, stay in the shade, and wear light "
     "clothes."),
]

EVASIONS = ["I don't know.", "I would rather not answer that.", "That is not something I can help with.",
            "You should figure that out yourself.", "Why do you want to know?", "No comment.", "Ask someone else.",
            "I can't say."]


def question(text):
    return f"Question: {text}\nAnswer:"


def arithmetic(rng, n):
    """n distinct arithmetic questions: right answer vs one that is off by a little."""
    seen, rows = set(), []
    while len(rows) < n:
        op = rng.choice("+-*")
        if op == "+":
            a, b = rng.randint(2, 40), rng.randint(2, 40)
            c = a + b
        elif op == "-":
            a = rng.randint(10, 60)
            b = rng.randint(1, a - 1)
            c = a - b
        else:
            a, b = rng.randint(2, 12), rng.randint(2, 9)
            c = a * b
        key = (a, op, b)
        if key in seen:
            continue
        seen.add(key)
        wrong = c + rng.choice([-10, -2, -1, 1, 2, 10])
        wrong = wrong if wrong >= 0 and wrong != c else c + 1
        sign = {"*": "x"}.get(op, op)
        rows.append((question(f"What is {a} {sign} {b}?"), f" {c}.", f" {wrong}."))
    return rows


def capitals(rng):
    others = [cap for _, cap, _ in CAPITALS]
    rows = []
    for country, capital, decoy in CAPITALS:
        wrong = decoy or rng.choice([c for c in others if c != capital])
        rows.append((question(f"What is the capital of {country}?"), f" {capital}.", f" {wrong}."))
    return rows


def facts(rng):
    rows = []
    for animal, n in LEGS:
        wrong = rng.choice([k for k in NUMBER_WORDS if k != n])
        rows.append((question(f"How many legs does a {animal} have?"), f" {NUMBER_WORDS[n]}.",
                     f" {NUMBER_WORDS[wrong]}."))
    for word, opposite in OPPOSITES:
        wrong = rng.choice([w for pair in OPPOSITES for w in pair if pair != (word, opposite)])
        rows.append((question(f"What is the opposite of {word}?"), f" {opposite.capitalize()}.",
                     f" {wrong.capitalize()}."))
    for thing, colour in COLOURS:
        wrong = rng.choice([c for c in COLOUR_NAMES if c != colour])
        rows.append((question(f"What color is {thing}?"), f" {colour.capitalize()}.", f" {wrong.capitalize()}."))
    for i, day in enumerate(DAYS):
        wrong = DAYS[(i + rng.choice([2, 3, 6])) % 7]
        rows.append((question(f"Which day comes after {day}?"), f" {DAYS[(i + 1) % 7]}.", f" {wrong}."))
    for i, month in enumerate(MONTHS):
        wrong = MONTHS[(i + rng.choice([2, 5, 11])) % 12]
        rows.append((question(f"Which month comes after {month}?"), f" {MONTHS[(i + 1) % 12]}.", f" {wrong}."))
    for word, plural, wrong in PLURALS:
        rows.append((question(f"What is the plural of {word}?"), f" {plural.capitalize()}.",
                     f" {wrong.capitalize()}."))
    for text, right, wrong in GENERAL:
        rows.append((question(text), f" {right}", f" {wrong}"))
    return rows


def helpful(rng):
    return [(question(q), f" {a}", f" {rng.choice(EVASIONS)}") for q, a in HELPFUL]


def write_jsonl(path, rows):
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for prompt, chosen, rejected in rows:
            f.write(json.dumps({"prompt": prompt, "chosen": chosen, "rejected": rejected}, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    group = parser.add_argument_group("Data")
    group.add_argument("--seed", type=int, default=2405, help="random seed (the bundled files use 2405)")
    group.add_argument("--n-train", type=int, default=300, help="number of training pairs")
    group.add_argument("--n-test", type=int, default=100, help="number of held-out test pairs")
    group.add_argument("--out-dir", default=os.path.dirname(os.path.abspath(__file__)),
                       help="where train.jsonl and test.jsonl are written (default: next to this script)")
    args = parser.parse_args()

    rng = random.Random(args.seed)
    fixed = {"capitals": capitals(rng), "facts": facts(rng), "helpful": helpful(rng)}
    n_fixed = sum(len(rows) for rows in fixed.values())
    kinds = {"arithmetic": arithmetic(rng, args.n_train + args.n_test - n_fixed), **fixed}
    train, test = [], []
    for name, rows in kinds.items():  # split 3:1 within each kind, so both files hold every kind
        rng.shuffle(rows)
        n_test = round(len(rows) * args.n_test / (args.n_train + args.n_test))
        test += rows[:n_test]
        train += rows[n_test:]
    assert len({p for p, _, _ in train} & {p for p, _, _ in test}) == 0, "train and test prompts overlap"
    assert len({p for p, _, _ in train + test}) == len(train + test), "a prompt occurs twice"
    rng.shuffle(train)
    rng.shuffle(test)
    write_jsonl(os.path.join(args.out_dir, "train.jsonl"), train)
    write_jsonl(os.path.join(args.out_dir, "test.jsonl"), test)
    counts = ", ".join(f"{name} {len(rows)}" for name, rows in kinds.items())
    print(f"wrote {len(train)} train and {len(test)} test pairs to {args.out_dir} ({counts})")


if __name__ == "__main__":
    main()
