"""Writes the bundled demo corpus: a few dozen records per source in each dataset's published raw
format.

    python data_prep/demo/make_demo.py    # rewrites the files next to this script (needs pyarrow)

The records are written for minroute (templated, arithmetic computed), not copied from the datasets;
the layout is the Hub's, so `python -m data_prep --source-dir data_prep/demo` reads them like the
real files.
"""

import json
import random
from pathlib import Path

HERE = Path(__file__).parent
R = random.Random(1234)

FUNCTIONS = [
    (
        "get_weather",
        "Get the current weather for a city",
        {
            "city": ("string", "The city name, e.g. Paris"),
            "unit": ("string", "celsius or fahrenheit"),
        },
        ["city"],
    ),
    (
        "get_stock_price",
        "Get the latest stock price",
        {"symbol": ("string", "Ticker symbol, e.g. AAPL")},
        ["symbol"],
    ),
    (
        "convert_currency",
        "Convert an amount between currencies",
        {
            "amount": ("number", "The amount"),
            "from": ("string", "Source currency code"),
            "to": ("string", "Target currency code"),
        },
        ["amount", "from", "to"],
    ),
    (
        "calculate_tip",
        "Calculate a tip",
        {"bill_amount": ("number", "Total bill"), "tip_percentage": ("number", "Tip in percent")},
        ["bill_amount", "tip_percentage"],
    ),
    (
        "send_email",
        "Send an email",
        {
            "to": ("string", "Recipient address"),
            "subject": ("string", "Subject"),
            "body": ("string", "Message body"),
        },
        ["to", "subject", "body"],
    ),
    (
        "create_todo",
        "Create a todo item",
        {"title": ("string", "Title"), "due_date": ("string", "YYYY-MM-DD")},
        ["title"],
    ),
    (
        "search_recipes",
        "Search recipes by ingredient",
        {"ingredient": ("string", "Main ingredient")},
        ["ingredient"],
    ),
    (
        "get_news_headlines",
        "Latest news headlines for a country",
        {"country": ("string", "Country name")},
        ["country"],
    ),
    (
        "translate_text",
        "Translate text",
        {"text": ("string", "Text"), "target_language": ("string", "Language")},
        ["text", "target_language"],
    ),
    (
        "book_table",
        "Book a restaurant table",
        {
            "restaurant": ("string", "Name"),
            "people": ("integer", "Guests"),
            "time": ("string", "HH:MM"),
        },
        ["restaurant", "people", "time"],
    ),
]
CITIES = [
    "Paris",
    "Tokyo",
    "Lagos",
    "Lima",
    "Oslo",
    "Cairo",
    "Sydney",
    "Toronto",
    "Mumbai",
    "Berlin",
    "Zürich",
]
SYMBOLS = ["AAPL", "MSFT", "TSLA", "AMZN", "NVDA", "GOOGL"]
CURRENCIES = ["USD", "EUR", "JPY", "GBP", "INR", "CHF"]
NAMES = [
    "Natalia",
    "Weng",
    "Betty",
    "Julie",
    "James",
    "Albert",
    "Mark",
    "Sarah",
    "Ken",
    "Alexis",
    "Tina",
    "Randy",
]
ITEMS = ["apples", "pencils", "cookies", "marbles", "stickers", "books", "cupcakes", "shells"]


def schema(fn):
    name, desc, props, req = fn
    return {
        "name": name,
        "description": desc,
        "parameters": {
            "type": "object",
            "properties": {k: {"type": t, "description": d} for k, (t, d) in props.items()},
            "required": req,
        },
    }


def example_call(fn):
    name = fn[0]
    city, sym = R.choice(CITIES), R.choice(SYMBOLS)
    args = {
        "get_weather": {"city": city, "unit": R.choice(["celsius", "fahrenheit"])},
        "get_stock_price": {"symbol": sym},
        "convert_currency": {
            "amount": R.choice([50, 120, 500, 1000]),
            "from": R.choice(CURRENCIES[:3]),
            "to": R.choice(CURRENCIES[3:]),
        },
        "calculate_tip": {
            "bill_amount": R.choice([42.5, 85, 120, 64]),
            "tip_percentage": R.choice([10, 15, 20]),
        },
        "send_email": {
            "to": f"{R.choice(NAMES).lower()}@example.com",
            "subject": "Meeting",
            "body": f"See you at {R.randint(9, 17)}:00 in room {R.randint(1, 9)}B.",
        },
        "create_todo": {
            "title": R.choice(["Buy groceries", "Call the bank", "Water the plants"]),
            "due_date": f"2024-0{R.randint(1, 9)}-1{R.randint(0, 9)}",
        },
        "search_recipes": {"ingredient": R.choice(["chicken", "lentils", "tofu", "salmon"])},
        "get_news_headlines": {"country": R.choice(["Japan", "Brazil", "Kenya", "Canada"])},
        "translate_text": {
            "text": R.choice(["Good morning", "Where is the station?"]),
            "target_language": R.choice(["French", "Spanish", "German"]),
        },
        "book_table": {
            "restaurant": R.choice(["Luigi's", "The Green Fork", "Sakura"]),
            "people": R.randint(2, 8),
            "time": f"{R.randint(18, 21)}:30",
        },
    }[name]
    ask = {
        "get_weather": f"What's the weather like in {args.get('city')} right now?",
        "get_stock_price": f"Can you tell me the current price of {args.get('symbol')}?",
        "convert_currency": (
            f"Please convert {args.get('amount')} {args.get('from')} to {args.get('to')}."
        ),
        "calculate_tip": (
            f"My bill is ${args.get('bill_amount')}. How much is a {args.get('tip_percentage')}%"
            " tip?"
        ),
        "send_email": f"Send an email to {args.get('to')} about the meeting: {args.get('body')}",
        "create_todo": f"Add a todo '{args.get('title')}' due {args.get('due_date')}.",
        "search_recipes": f"Find me a recipe with {args.get('ingredient')}.",
        "get_news_headlines": f"What are the latest headlines in {args.get('country')}?",
        "translate_text": f"Translate '{args.get('text')}' into {args.get('target_language')}.",
        "book_table": (
            f"Book a table at {args.get('restaurant')} for {args.get('people')} at"
            f" {args.get('time')}."
        ),
    }[name]
    return ask, args


def tool_response(name, args):
    if name == "get_weather":
        return {
            "city": args["city"],
            "temperature": R.randint(-5, 35),
            "condition": R.choice(["sunny", "rain", "cloudy"]),
        }
    if name == "get_stock_price":
        return {"symbol": args["symbol"], "price": round(R.uniform(50, 900), 2)}
    if name == "calculate_tip":
        return {"tip_amount": round(args["bill_amount"] * args["tip_percentage"] / 100, 2)}
    return {"status": "success"}


HERMES_SYSTEM = (
    "You are a function calling AI model. You are provided with function signatures within <tools>"
    " </tools> XML tags. You may call one or more functions to assist with the user query. Don't"
    " make assumptions about what values to plug into functions.\n<tools>\n{tools}\n</tools>\nFor"
    " each function call return a json object with function name and arguments within <tool_call>"
    " </tool_call> tags with the following schema:\n<tool_call>\n{{'arguments': <args-dict>,"
    " 'name': <function-name>}}\n</tool_call>\n"
)


def hermes_row(i, multi_turn):
    fns = R.sample(FUNCTIONS, R.randint(1, 3))
    tools = [{"type": "function", "function": schema(f)} for f in fns]
    fn = fns[0]
    ask, args = example_call(fn)
    conv = [
        {"from": "system", "value": HERMES_SYSTEM.format(tools=repr(tools))},
        {"from": "human", "value": ask},
        {
            "from": "gpt",
            "value": "<tool_call>\n" + repr({"arguments": args, "name": fn[0]}) + "\n</tool_call>",
        },
    ]
    if multi_turn:
        conv += [
            {
                "from": "tool",
                "value": (
                    "<tool_response>\n"
                    + repr({"name": fn[0], "content": tool_response(fn[0], args)})
                    + "\n</tool_response>"
                ),
            },
            {
                "from": "gpt",
                "value": f"Done: I used {fn[0]} and here is the result summarised for you.",
            },
        ]
    return {
        "id": f"demo-{'multi' if multi_turn else 'single'}-{i:04d}",
        "conversations": conv,
        "category": "Demo",
        "subcategory": fn[0],
        "task": ask,
    }


def glaive_row(i):
    if i % 7 == 6:  # rows without functions exist in Glaive too
        q = R.choice(
            ["Can you explain photosynthesis briefly?", "Tell me a fun fact about octopuses."]
        )
        return {
            "system": (
                "SYSTEM: You are a helpful assistant, with no access to external functions.\n\n\n"
            ),
            "chat": (
                f"USER: {q}\n\n\nASSISTANT: Sure! Here is a short answer to your question."
                " <|endoftext|>\n\n\n"
            ),
        }
    fns = R.sample(FUNCTIONS, R.randint(1, 2))
    system = (
        "SYSTEM: You are a helpful assistant with access to the following functions. Use them if"
        " required -\n" + "\n\n".join(json.dumps(schema(f), indent=4) for f in fns) + "\n\n\n"
    )
    fn = fns[0]
    ask, args = example_call(fn)
    call = f'{{"name": "{fn[0]}", "arguments": \'{json.dumps(args)}\'}}'
    chat = (
        f"USER: {ask}\n\n\nASSISTANT: <functioncall> {call} <|endoftext|>\n\n\n"
        f"FUNCTION RESPONSE: {json.dumps(tool_response(fn[0], args))}\n\n\n"
        f"ASSISTANT: I have taken care of that with {fn[0]}. <|endoftext|>\n\n\n"
    )
    return {"system": system, "chat": chat}


def gsm8k_row():
    a, b, c = R.randint(3, 60), R.randint(2, 9), R.randint(2, 20)
    name, item = R.choice(NAMES), R.choice(ITEMS)
    kind = R.choice([0, 1, 2, 3, 3])
    if (
        kind == 3
        # a long multi-step problem, so planning lengths (prompt and whole row) overlap tool-call
        # lengths
    ):
        steps, total, lines = R.randint(2, 5), a, []
        q = f"{name} starts the week with {a} {item}."
        for day in [
            "Monday",
            "Tuesday",
            "Wednesday",
            "Thursday",
            "Friday",
            "Saturday",
            "Sunday",
            "the next Monday",
            "the next Tuesday",
            "the next Wednesday",
            "the next Thursday",
            "the next Friday",
            "the next Saturday",
            "the next Sunday",
        ][:steps]:
            n, k = R.randint(2, 6), R.randint(2, 9)
            q += (  # distractors: GSM8K has them too
                f" On {day} {name} walks to the market, buys {n} packs of {k} {item} and gives {k}"
                f" {item} to a friend who lives nearby. The market opens at {R.randint(6, 10)} in"
                f" the morning, {R.choice(NAMES)} sells {R.choice(ITEMS)} there for"
                f" ${R.randint(2, 9)} a pack, and the walk takes {R.randint(5, 40)} minutes each"
                " way."
            )
            new = total + n * k - k
            lines.append(
                f"On {day}: {n} * {k} = <<{n}*{k}={n * k}>>{n * k} bought, {total} + {n * k} - {k}"
                f" = <<{total}+{n * k}-{k}={new}>>{new} {item}."
            )
            total = new
        q += f" How many {item} does {name} have at the end?"
        ans = "\n".join(lines) + f"\n#### {total}"
    elif kind == 0:
        q = (
            f"{name} has {a} {item}. She buys {b} bags with {c} {item} in each bag. How many {item}"
            " does she have now?"
        )
        bought = b * c
        ans = (
            f"{name} buys {b} * {c} = <<{b}*{c}={bought}>>{bought} {item}.\nNow she has {a} +"
            f" {bought} = <<{a}+{bought}={a + bought}>>{a + bought} {item}.\n#### {a + bought}"
        )
    elif kind == 1:
        q = (
            f"A box holds {c} {item}. {name} fills {b} boxes and gives away {a % c} {item}. How"
            " many are left?"
        )
        total = b * c
        ans = (
            f"{b} boxes hold {b} * {c} = <<{b}*{c}={total}>>{total} {item}.\nAfter giving away"
            f" {a % c}, {total} - {a % c} = <<{total}-{a % c}={total - a % c}>>{total - a % c} are"
            f" left.\n#### {total - a % c}"
        )
    else:
        price = R.randint(2, 15)
        q = (
            f"{name} sells {a} {item} for ${price} each and spends ${b * c} on supplies. What is"
            " the profit?"
        )
        rev = a * price
        ans = (
            f"Revenue is {a} * {price} = $<<{a}*{price}={rev}>>{rev}.\nProfit is {rev} - {b * c} ="
            f" $<<{rev}-{b * c}={rev - b * c}>>{rev - b * c}.\n#### {rev - b * c}"
        )
    return {"question": q, "answer": ans}


TURING = [
    (
        "Physics",
        "Mechanics",
        (
            "A ball is dropped from 20 m. Taking $g = 9.8\\,\\mathrm{m/s^2}$, how long does it take"
            " to reach the ground?"
        ),
        "Use $h = \\frac{1}{2} g t^2$, so $t = \\sqrt{2h/g} = \\sqrt{40/9.8} \\approx 2.02$ s.",
    ),
    (
        "Mathematics",
        "Calculus",
        "Compute $\\int_0^1 x^2\\,dx$.",
        "$\\int_0^1 x^2 dx = [x^3/3]_0^1 = 1/3$.",
    ),
    (
        "Chemistry",
        "Stoichiometry",
        "How many moles are in 36 g of water?",
        "Molar mass is 18 g/mol, so 36/18 = 2 mol.",
    ),
    (
        "Mathematics",
        "Linear algebra",
        "Find the determinant of $\\begin{pmatrix}1 & 2\\\\ 3 & 4\\end{pmatrix}$.",
        "$1 \\cdot 4 - 2 \\cdot 3 = -2$.",
    ),
    (
        "Computer Science",
        "Algorithms",
        "What is the time complexity of binary search on n sorted items?",
        "Each step halves the range, so it takes $O(\\log n)$ comparisons.",
    ),
    (
        "Physics",
        "Electricity",
        "A 12 V battery drives 3 A through a resistor. What is the resistance?",
        "By Ohm's law $R = V/I = 12/3 = 4\\,\\Omega$.",
    ),
    (
        "Mathematics",
        "Probability",
        "Two fair dice are rolled. What is the probability the sum is 7?",
        "6 of the 36 outcomes sum to 7, so $P = 1/6$.",
    ),
    (
        "Biology",
        "Genetics",
        "Two heterozygous parents (Aa x Aa): what fraction of offspring is aa?",
        "The Punnett square gives 1/4 aa.",
    ),
    (
        "Mathematics",
        "Series",
        "Sum the geometric series $\\sum_{k=0}^{\\infty} 2^{-k}$.",
        "$\\frac{1}{1 - 1/2} = 2$.",
    ),
    (
        "Physics",
        "Thermodynamics",
        "How much heat raises 2 kg of water by 5 K ($c = 4186$ J/kg K)?",
        "$Q = m c \\Delta T = 2 \\cdot 4186 \\cdot 5 = 41860$ J.",
    ),
]


def main():
    import pyarrow as pa
    import pyarrow.parquet as pq

    h = HERE / "hermes-function-calling-v1"
    h.mkdir(exist_ok=True)
    (h / "func-calling-singleturn.json").write_text(
        json.dumps([hermes_row(i, False) for i in range(48)], indent=1)
    )
    (h / "func-calling.json").write_text(
        json.dumps([hermes_row(i, True) for i in range(40)], indent=1)
    )
    g = HERE / "glaive-function-calling-v2"
    g.mkdir(exist_ok=True)
    (g / "glaive-function-calling-v2.json").write_text(
        json.dumps([glaive_row(i) for i in range(90)], indent=1)
    )
    q = HERE / "gsm8k" / "main"
    q.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", 60), ("test", 50)):
        rows = [gsm8k_row() for _ in range(n)]
        table = pa.table(
            {"question": [r["question"] for r in rows], "answer": [r["answer"] for r in rows]}
        )
        pq.write_table(table, q / f"{split}-00000-of-00001.parquet")
    t = HERE / "Turing-Open-Reasoning"
    t.mkdir(exist_ok=True)
    rows = [
        {
            "conversation_id": f"demo-{i}",
            "domain": d,
            "sub-domain": s,
            "question": qq,
            "answer": a,
            "code": "",
        }
        for i, (d, s, qq, a) in enumerate(TURING)
    ]
    (t / "Computational_STEM_QA_Dataset.json").write_text(
        json.dumps(rows, indent=1, ensure_ascii=False)
    )


if __name__ == "__main__":
    main()
